"""The `evalfleet` command. Each command is a thin shell over the layer that does the work.

User mistakes raise `EvalfleetError`; `main` turns them into one sentence on stderr and
the error's exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from evalfleet.types import EvalfleetError

app = typer.Typer(
    name="evalfleet",
    help="Evaluate language models at any scale: plan layouts, run evaluations, schedule jobs, monitor GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> None:
    """Print one sentence on stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except EvalfleetError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
