"""`sla2 report` (alias `sla2 sparsity-report`): per-layer, per-head sparsity and accuracy of a converted model.

The model runs on sample inputs; at every converted layer the report compares SLA2 against full
attention on the same q, k, v: how much of the softmax mass the selected blocks hold, how well the
router finds the best blocks, how alpha follows that mass, and how far the output is from dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.cli.sample_options import (
    ClipsOption,
    DeviceOption,
    InputsOption,
    QuietOption,
    ResolutionOption,
    TimestepsOption,
)
from sla2cli.ops.quantization import QUANT_AUTO, REQUESTABLE_QUANT_MODES
from sla2cli.report.job import DEFAULT_VIDEO_STEPS, ReportRequest, run_report_job
from sla2cli.report.runner import DEFAULT_TIMESTEPS_TEXT

HELP = (
    "Per-layer and per-head sparsity and accuracy of a converted model: captured softmax mass, router "
    "recall, alpha, error against full attention (beside the heuristic router's), and what the low-bit "
    "sparse branch (--quant) adds to it. MODEL_OR_DIR is an "
    "SLA2 checkpoint folder or Hub id; without it, the embedded model converted at --sparsity (default "
    "0.97) on its own validation clips."
)


def report(
    model_or_dir: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODEL_OR_DIR]",
            help="SLA2 checkpoint: a folder, or a Hub id org/name or org/name@revision; omit for the embedded model.",
            show_default=False,
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Report at this sparsity (share of key blocks sent to the linear branch) instead of "
                     "the model's own, e.g. 0.97.", show_default=False),
    ] = None,
    inputs: InputsOption = None,
    timesteps: TimestepsOption = DEFAULT_TIMESTEPS_TEXT,
    resolution: ResolutionOption = None,
    clips: ClipsOption = None,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Write one row per (layer, head) as CSV.", show_default=False)
    ] = None,
    json: Annotated[
        Path | None,
        typer.Option("--json", help="Write settings, summaries and one row per (layer, head) as JSON.",
                     show_default=False),
    ] = None,
    heatmap: Annotated[
        Path | None,
        typer.Option(help="Write a PNG heatmap of the relative error per layer and head (SLA2 and heuristic).",
                     show_default=False),
    ] = None,
    video: Annotated[
        Path | None,
        typer.Option(help="Write a GIF of a sample from the dense model beside the same sample (same noise) "
                     "from the SLA2 model, each half labelled in the image; embedded model only (its latents "
                     "are viewable).", show_default=False),
    ] = None,
    video_steps: Annotated[int, typer.Option(help="Euler flow-matching steps for --video.")] = DEFAULT_VIDEO_STEPS,
    quant: Annotated[
        str,
        typer.Option(
            metavar="|".join(REQUESTABLE_QUANT_MODES),
            help="Low-bit sparse-branch mode to compare, per layer, with the unquantised op on the same q, k, v, "
            "routing and alpha (column lowbit_rel_l2_vs_sla2): int8, int8-fp8, auto (int8 where the GPU "
            "runs it, and on CPU, emulated), or none to leave the column out.",
        ),
    ] = QUANT_AUTO,
    model_quality: Annotated[
        bool,
        typer.Option("--model-quality/--no-model-quality",
                     help="Run the inputs again with dense attention for the model-level line: the transformer "
                     "output's relative L2 error against dense and, for the embedded model, the validation loss "
                     "against dense (CSV: last row, layer = model; JSON: model_quality). --no-model-quality skips "
                     "that second pass."),
    ] = True,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the noise (and of random inputs).")] = 0,
    offline: Annotated[bool, typer.Option(help="Use only the Hugging Face cache; never the network.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Measure every converted layer against full attention, print the table, write the files asked for."""
    request = ReportRequest(
        model_or_dir=model_or_dir, sparsity=sparsity, inputs=inputs, timesteps=timesteps, resolution=resolution,
        clips=clips, csv=csv, json=json, heatmap=heatmap, video=video, video_steps=video_steps, quant=quant,
        model_quality=model_quality, device=device, seed=seed, offline=offline, quiet=quiet,
    )
    run_report_job(request, Console())


def register(app: typer.Typer) -> None:
    """Add `sla2 report` and its alias `sla2 sparsity-report`."""
    app.command("report", help=HELP)(report)
    app.command("sparsity-report", help="Alias of `sla2 report`.")(report)
