"""The `sla2` command line. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from sla2cli.errors import UserError

app = typer.Typer(
    name="sla2",
    help="SLA2 sparse-linear attention for video diffusion transformers: convert a model, "
    "benchmark it against FlashAttention2, and report sparsity and accuracy per layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    from sla2cli.cli import demo

    demo.register(app)
    from sla2cli.cli import bench

    bench.register(app)
    from sla2cli.cli import convert

    convert.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user mistakes print one line and exit with code 2."""
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    except ValueError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:  # click's usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(2)
        raise
