"""Typed errors of tleg-deploy.

Library code raises these with the offending value and a hint; only the CLI turns them into
one-line messages and exit codes (``tleg_deploy.cli.app``). Stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable


def key_mismatch(found: Iterable[str], expected: Iterable[str], noun: str = "key") -> str | None:
    """The first difference between two key sets, worded for an error message, or ``None``:
    ``is missing key 'a' (2 missing)`` or ``has unexpected key 'b'``. Missing keys are reported first."""
    have, want = set(found), set(expected)
    for problem, keys in (("is missing", sorted(want - have)), ("has unexpected", sorted(have - want))):
        if keys:
            count = f" ({len(keys)} {problem.split()[-1]})" if len(keys) > 1 else ""
            return f"{problem} {noun} {keys[0]!r}{count}"
    return None


class TlegError(Exception):
    """Base class: ``message`` says what was wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:  # the hint survives pickling (worker processes)
        return type(self), (self.message, self.hint)


class SpecError(TlegError, ValueError):
    """A ViT spec that cannot exist (e.g. embed_dim not divisible by num_heads)."""


class DepthError(TlegError, ValueError):
    """A depth outside the supported range."""


class FormatError(TlegError, ValueError):
    """A file that is not what it claims to be: wrong format, schema, keys or shapes."""


class NonFiniteError(FormatError):
    """Weights or measurements holding NaN or infinity: never written, loaded or reported as a result."""


class DivergedError(NonFiniteError):
    """Training produced a non-finite loss or non-finite weights (the run is stopped, not saved)."""


class CheckpointError(FormatError):
    """A third-party checkpoint whose keys or shapes do not match what we expect."""


class UnitError(TlegError, ValueError):
    """A quantity string such as ``5ms`` or ``256MB`` that cannot be parsed."""


class DataError(TlegError, ValueError):
    """Training or calibration data that cannot be used."""


class DeviceError(TlegError, LookupError):
    """An unknown device or a profile that does not apply."""


class UnknownDeviceError(DeviceError):
    """No profile of that name anywhere profiles are looked up (``fit --ssh`` then measures one)."""


class BackendError(TlegError, RuntimeError):
    """A runtime backend that is unknown or whose package is missing."""


class ExportError(TlegError, RuntimeError):
    """An export that failed or whose validation did not pass."""


class InfeasibleError(TlegError, ValueError):
    """A budget that no option satisfies."""


class OutputError(TlegError, ValueError):
    """An output that would replace an input, a file tleg-deploy did not write, or a non-regular file
    (``tleg_deploy.files.outputs``)."""
