"""The typer app, the options shared by several commands, and the one table that maps errors to
messages and exit codes. Commands live in sibling modules and register themselves with
``@command``; each is thin: parse, one library call, render.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tleg_deploy.errors import NonFiniteError, TlegError
from tleg_deploy.model.spec import MAX_DEPTH, PRESETS

app = typer.Typer(
    name="tleg-deploy",
    help="Deploy Vision Transformers of any depth from one TLEG learngene.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# (exception type, exit code, how an OSError that names a file reads): first match wins.
# Everything else is an internal error (70).
_EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (TlegError, 2, ""),
    (FileNotFoundError, 2, "no such file or directory: {path}"),
    (IsADirectoryError, 2, "{path} is a directory, but a file is expected"),
    (NotADirectoryError, 2, "{path}: a part of this path is not a directory"),
    (FileExistsError, 2, "{path} already exists"),
    (PermissionError, 3, "permission denied: {path}"),
    (OSError, 3, "{path}: {reason}"),
    (KeyboardInterrupt, 130, ""),
)


def _message(e: BaseException, template: str) -> str:
    """One line. An ``OSError`` from the system (``[Errno 21] Is a directory: 'x'``) is reworded to
    name the user's path; one we raised with a sentence keeps it."""
    if isinstance(e, OSError) and e.filename is not None and template:
        reason = (e.strerror or type(e).__name__).lower()
        return template.format(path=os.fsdecode(e.filename), reason=reason)
    text = str(e) if not isinstance(e, OSError) or e.strerror is None else e.strerror.lower()
    return " ".join(text.split()) or type(e).__name__


def _fail(e: BaseException) -> typer.Exit:
    code, template = next(((c, m) for t, c, m in _EXIT_CODES if isinstance(e, t)), (70, ""))
    if isinstance(e, KeyboardInterrupt):
        err.print("[red]interrupted[/red]: nothing half-written was left behind")
    elif code == 70:
        err.print(f"[red]internal error[/red]: {type(e).__name__}: {escape(_message(e, ''))} "
                  "(set TLEG_DEBUG=1 for a traceback, and please report it)", highlight=False, soft_wrap=True)
    else:
        err.print(f"[red]error[/red]: {escape(_message(e, template))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """Register a command whose exceptions become one-line errors (tracebacks with TLEG_DEBUG=1)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except (typer.Exit, typer.Abort):
                raise
            except BaseException as e:
                if os.environ.get("TLEG_DEBUG") == "1" or isinstance(e, SystemExit):
                    raise
                raise _fail(e) from None

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON. A non-finite float (NaN, inf) anywhere in it is an error, never printed
    (a bare ``NaN`` is not JSON, and a NaN figure must not read as a result); nothing is printed then."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def _finite(x: Any, where: str = "output") -> Any:
    if isinstance(x, float):
        if not math.isfinite(x):
            raise NonFiniteError(f"{where} is {x!r}", hint="a measurement or weight went non-finite; nothing was "
                                                          "printed")
        return x
    if isinstance(x, dict):
        return {k: _finite(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if hasattr(x, "item") and hasattr(x, "dtype"):  # a numpy / torch scalar
        return _finite(x.item(), where) if getattr(x, "ndim", 0) == 0 else str(x)
    return x


# Shared options, declared once.
LearngeneOpt = Annotated[
    str, typer.Option("--learngene", "-l", help="Learngene file, or 'demo' for the bundled one.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
# Output paths are typed `str`, not Path, in every command: the output policy (files.outputs) must see
# what was typed, and Path would turn "" into "." and drop the trailing "/" of "newdir/".
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing output files (never an input, never a "
                                                        "non-regular file).")]
DepthOpt = Annotated[int, typer.Option("--depth", "-d", min=1, max=MAX_DEPTH, help="Number of blocks.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SPEC_HELP = (f"Architecture: a preset ({', '.join(PRESETS)}), a spec .json file, or key=value items "
             "separated by commas, after a preset for the keys left out: digits,img_size=32,in_chans=3 "
             "(keys: img_size, patch_size, in_chans, embed_dim, num_heads, mlp_ratio, num_classes, ...).")
SpecOpt = Annotated[str | None, typer.Option("--spec", help=SPEC_HELP, show_default=False)]
"""The one --spec option, parsed by ``tleg_deploy.model.spec_text.parse_spec``; each command says what
no --spec means (a preset, the teacher's, or inferred from --data)."""


def data_path(data: str | None) -> str | None:
    """The file or folder behind ``folder:PATH`` / ``npz:PATH`` (an input no output may replace)."""
    if data is None:
        return None
    kind, sep, path = data.partition(":")
    return path if sep and kind in ("folder", "npz") and path else None


def _register_commands() -> None:
    # Imported for their @command side effect.
    from tleg_deploy.cli import (
        core,  # noqa: F401
        export,  # noqa: F401
        fit,  # noqa: F401
        kit,  # noqa: F401
        profile,  # noqa: F401
        report,  # noqa: F401
        train,  # noqa: F401
    )


_register_commands()
