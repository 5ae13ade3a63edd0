"""The `sla2` command line. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from sla2cli.errors import UserError

# Typer may ship its own copy of click; find its base error class through a public Typer name.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="sla2",
    help="SLA2 sparse-linear attention for video diffusion transformers: convert a model, calibrate and "
    "fine-tune it, benchmark it against FlashAttention2, and report sparsity and accuracy per layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    """Attach every sub-command once (main() may run many times in one process, as in tests)."""
    if app.registered_commands:
        return
    from sla2cli.cli import bench, calibrate, convert, demo, finetune, report

    for module in (demo, convert, calibrate, finetune, bench, report):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user mistakes print one line and exit with code 2."""
    _register_commands()
    try:
        result = app(args=argv, standalone_mode=False)
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
