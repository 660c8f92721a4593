"""The ``tleg-deploy`` command line (typer). Nothing in the library imports this package."""

from __future__ import annotations


def main() -> None:
    from tleg_deploy.cli.app import app

    app()
