"""The `sla2` command line. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.cli import bench, calibrate, convert, demo, finetune, report
from sla2cli.errors import UserError
from sla2cli.version import __version__

# Typer may ship its own copy of click; find its base error class through a public Typer name.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="sla2",
    help="SLA2 sparse-linear attention for video diffusion transformers: convert a model, calibrate and "
    "fine-tune it, benchmark it against FlashAttention2, and report sparsity and accuracy per layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # sub-commands inherit it
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"sla2 {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version of sla2 and exit."),
    ] = False,
) -> None:
    """Options of `sla2` itself, before the sub-command."""


def _register_commands() -> None:
    """Attach every sub-command once (main() may run many times in one process, as in tests)."""
    if app.registered_commands:
        return
    for module in (demo, convert, calibrate, finetune, bench, report):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user mistakes print one line and exit with code 2."""
    _register_commands()
    try:
        result = app(args=argv, prog_name="sla2", standalone_mode=False)
    except (UserError, ValueError) as error:
        _fail(str(error))
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(130)
    except _CLICK_ERROR as error:  # usage errors: click's own message
        error.show()
        sys.exit(2)
    if isinstance(result, int) and result:  # standalone_mode=False hands typer.Exit codes back
        sys.exit(result)


def _fail(message: str) -> None:
    """One red line on stderr (never wrapped, even in a narrow or non-terminal stream), exit 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(2)
