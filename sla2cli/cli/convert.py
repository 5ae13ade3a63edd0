"""`sla2 convert`: swap a model's self-attention for SLA2 and write a checkpoint folder.

The work is `sla2cli.integration.convert_job` (skeletons built from the config, so converting a 14B model
takes seconds and little memory); the tables are `sla2cli.integration.convert_output`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.integration.convert_job import ConvertRequest, run_convert_job
from sla2cli.integration.convert_output import recipes_table, summary_table
from sla2cli.ops.quantization import REQUESTABLE_QUANT_MODES

QUANT_HELP = (
    "Low-bit forward of the sparse (exact) branch: int8 (INT8 Q K^T, P V in the model's own precision; "
    "GPUs of compute capability 8.0+), int8-fp8 (INT8 Q K^T, FP8 P V: no faster on an H100 and about "
    "3.7% off on random inputs; 8.9+), none, or auto (per call: int8 only where benchmarks/results/ "
    "measured it faster than bf16 on that GPU, head dim and shape; bf16 elsewhere, and the summary says "
    "which). The backward "
    "stays unquantised (straight through), so fine-tuning with it is quantisation-aware. Default: "
    "none, or the checkpoint's own when re-converting one."
)


def convert_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Hub id org/name or org/name@revision, a local diffusers folder, or an SLA2 checkpoint to re-convert "
            "(e.g. with another sparsity). Default: the embedded model that ships with sla2.",
            show_default=False,
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(help="Recipe to use (see --list-recipes). Default: found from the Hub id or the architecture."),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Share of key blocks per query block sent to the linear branch, in [0, 1). "
                     "Default: the recipe's (0.97).", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder to write. Default: ./<model name>-sla2.", show_default=False),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(metavar="|".join(REQUESTABLE_QUANT_MODES), help=QUANT_HELP, show_default=False),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it exists and holds only an sla2 checkpoint (or nothing); "
                     "a folder with other files is never replaced."),
    ] = False,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Use only the Hugging Face cache, never the network (like HF_HUB_OFFLINE=1)."),
    ] = False,
    untrained: Annotated[
        bool,
        typer.Option("--untrained", help="Embedded model only: convert the shipped dense model with an untrained "
                     "router and alpha (the start of sla2 calibrate and sla2 finetune) instead of the shipped SLA2 "
                     "model, whose router and alpha are calibrated and base weights fine-tuned at 0.97."),
    ] = False,
    list_recipes: Annotated[bool, typer.Option("--list-recipes", help="Show the recipes and exit.")] = False,
) -> None:
    """Swap the self-attention of a video diffusion transformer for SLA2 and write a checkpoint."""
    console = Console()
    if list_recipes:
        console.print(recipes_table(console))
        return
    request = ConvertRequest(
        model=model, recipe=recipe, sparsity=sparsity, out=out, quant=quant, overwrite=overwrite, offline=offline,
        untrained=untrained,
    )
    done = run_convert_job(request, console)
    console.print(summary_table(done.components, done.recipe, done.source, done.out, done.seconds, done.weights))


def register(app: typer.Typer) -> None:
    """Add `convert` to the app."""
    app.command("convert", no_args_is_help=False)(convert_command)
