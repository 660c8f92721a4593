"""Strict reading of our JSON files (DESIGN.md §4): objects with required and optional keys,
typed fields, ``format`` + ``schema_version`` checks, and unknown keys rejected with an error that
names the key (``errors.key_mismatch``). Every error is a ``FormatError`` naming the field by its
path (``entries[0].points[2].depth``); a loader may re-raise it with the file's name. Stdlib only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from pathlib import PurePosixPath
from typing import Any

from tleg_deploy.errors import FormatError, key_mismatch

_SHA256 = re.compile(r"[0-9a-f]{64}")


def obj(data: Any, where: str, keys: Collection[str] | None, optional: Collection[str] = ()) -> dict[str, Any]:
    """``data`` as a JSON object whose keys are exactly ``keys`` plus any of ``optional``
    (``keys=None``: any keys)."""
    if not isinstance(data, dict):
        raise FormatError(f"field '{where}' must be a JSON object, got {type(data).__name__}")
    if keys is not None:
        have = set(data)
        if problem := key_mismatch(have, set(keys) | (have & set(optional))):
            raise FormatError(f"field '{where}' {problem}")
    return data


def header(data: Any, where: str, fmt: str, version: object, hint: str | None = None) -> None:
    """``data['format'] == fmt`` and ``data['schema_version'] == version`` (checked before the keys, so
    a foreign or newer file is named as such rather than as one with odd keys); ``hint`` goes with a
    version mismatch."""
    if not isinstance(data, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise FormatError(f"field 'format' is {data.get('format')!r}, expected {fmt!r}")
    if data.get("schema_version") != version:
        raise FormatError(f"field 'schema_version' is {data.get('schema_version')!r}; this version reads "
                          f"{version!r}", hint=hint)


def lst(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list):
        raise FormatError(f"field '{where}' must be a JSON list, got {type(data).__name__}")
    return data


def string(data: Any, where: str, *, nonempty: bool = False) -> str:
    if not isinstance(data, str) or (nonempty and not data.strip()):
        raise FormatError(f"field '{where}' must be a {'non-empty ' if nonempty else ''}string, got {data!r}")
    return data


def integer(data: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise FormatError(f"field '{where}' must be an integer, got {data!r}")
    if minimum is not None and data < minimum:
        raise FormatError(f"field '{where}' is {data}, must be >= {minimum}")
    return data


def number(data: Any, where: str, *, minimum: float | None = None) -> float:
    """A finite JSON number (``NaN``/``Infinity``, which Python's json accepts, are refused)."""
    if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
        raise FormatError(f"field '{where}' must be a finite number, got {data!r}")
    if minimum is not None and data < minimum:
        raise FormatError(f"field '{where}' is {data}, must be >= {minimum}")
    return float(data)


def choice(value: str, choices: Sequence[str], where: str) -> None:
    """``where`` is a phrase such as ``field 'runtime.backend'``."""
    if value not in choices:
        raise FormatError(f"{where} is {value!r}", hint=f"expected one of {', '.join(choices)}")


def sha256_hex(data: Any, where: str) -> str:
    if not isinstance(data, str) or not _SHA256.fullmatch(data):
        raise FormatError(f"field '{where}' must be a sha256 (64 lowercase hex digits), got {data!r}")
    return data


def relative_path(data: Any, where: str) -> str:
    """A plain relative path that stays inside its directory: no absolute path, no ``..``, no
    backslash or drive, already normal (no ``./``, ``//`` or trailing ``/``)."""
    if not isinstance(data, str) or not data:
        raise FormatError(f"field '{where}' must be a non-empty relative path, got {data!r}")
    p = PurePosixPath(data)
    if p.is_absolute() or ".." in p.parts or str(p) != data or any(c in data for c in "\\:\x00"):
        raise FormatError(f"field '{where}' is {data!r}, not a plain relative path inside the directory",
                          hint="the file was edited or corrupted")
    return data


def finite_numbers(data: Any, where: str) -> None:
    """Every number anywhere inside ``data`` is finite."""
    if isinstance(data, float) and not math.isfinite(data):
        raise FormatError(f"field '{where}' must be a finite number, got {data!r}")
    if isinstance(data, dict):
        for k, v in data.items():
            finite_numbers(v, f"{where}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            finite_numbers(v, f"{where}[{i}]")
