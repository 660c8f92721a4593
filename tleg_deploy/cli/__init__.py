"""The ``tleg-deploy`` command line (typer). Nothing in the library imports this package."""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point. Usage errors (``--depth abc``, an unknown option) become one line, like every
    other error; typer would draw a multi-line box."""
    from rich.markup import escape

    from tleg_deploy.cli.app import app, err

    try:
        code = app(standalone_mode=False)
    except Exception as e:  # typer's vendored click exceptions: duck-typed, their module is private
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `tleg-deploy`: show the help
            sys.stdout.write(e.format_message() + "\n")
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[red]error[/red]: {escape(e.format_message() + hint)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
