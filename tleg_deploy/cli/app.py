"""The typer app, the options shared by several commands, and the one table that maps errors to
messages and exit codes. Commands live in sibling modules and register themselves with
``@command``; each is thin: parse, one library call, render.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tleg_deploy.errors import TlegError
from tleg_deploy.model.spec import MAX_DEPTH

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

# (exception type, exit code): first match wins. Everything else is an internal error.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (TlegError, 2),
    (FileNotFoundError, 2),
    (PermissionError, 3),
    (OSError, 3),
    (KeyboardInterrupt, 130),
)


def _fail(e: BaseException) -> typer.Exit:
    code = next((c for t, c in _EXIT_CODES if isinstance(e, t)), 70)
    if isinstance(e, KeyboardInterrupt):
        err.print("[red]interrupted[/red]: nothing half-written was left behind")
    elif code == 70:
        err.print(f"[red]internal error[/red]: {type(e).__name__}: {escape(str(e))} "
                  "(set TLEG_DEBUG=1 for a traceback, and please report it)", highlight=False)
    else:
        err.print(f"[red]error[/red]: {escape(str(e))}", highlight=False, soft_wrap=True)
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
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# Shared options, declared once.
LearngeneOpt = Annotated[
    str, typer.Option("--learngene", "-l", help="Learngene file, or 'demo' for the bundled one.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write.")]
DepthOpt = Annotated[int, typer.Option("--depth", "-d", min=1, max=MAX_DEPTH, help="Number of blocks.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


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
