"""`sla2 report` (alias `sla2 sparsity-report`): per-layer, per-head sparsity and accuracy of a converted model.

The model runs on sample inputs; at every converted layer the report compares SLA2 against full
attention on the same q, k, v: how much of the softmax mass the selected blocks hold, how well the
router finds the best blocks, how alpha follows that mass, and how far the output is from dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from sla2cli.cli.sample_options import (
    DEFAULT_TIMESTEPS_TEXT,
    ClipsOption,
    DeviceOption,
    InputsOption,
    QuietOption,
    ResolutionOption,
    TimestepsOption,
)
from sla2cli.devices import model_dtype, resolve_device
from sla2cli.errors import UserError
from sla2cli.files import check_output_file
from sla2cli.ops.quantization import QUANT_AUTO, REQUESTABLE_QUANT_MODES
from sla2cli.progress import progress_bar
from sla2cli.report.output import (
    model_csv_row,
    render_quality,
    render_table,
    report_document,
    write_csv,
    write_heatmap,
    write_json,
    write_side_by_side_gif,
)
from sla2cli.report.runner import (
    ReportResult,
    ReportSettings,
    ReportTarget,
    check_settings,
    lowbit_mode,
    parse_timesteps,
    run_report,
)

HELP = (
    "Per-layer and per-head sparsity and accuracy of a converted model: captured softmax mass, router "
    "recall, alpha, error against full attention (beside the heuristic router's), and what the low-bit "
    "sparse branch (--quant) adds to it. MODEL_OR_DIR is an "
    "SLA2 checkpoint folder or Hub id; without it, the embedded model converted at --sparsity (default "
    "0.97) on its own validation clips."
)
DEFAULT_VIDEO_STEPS = 8
DENSE_LABEL = "dense attention"
MIN_VIDEO_STEPS = 1


def _measure(
    target: ReportTarget, settings: ReportSettings, device: torch.device, console: Console, quiet: bool
) -> ReportResult:
    dtype = model_dtype(device)
    with progress_bar(console) as progress:
        task = progress.add_task("layers measured", total=None, visible=not quiet)
        return run_report(
            target, settings, device=device, dtype=dtype,
            on_start=lambda total: progress.update(task, total=total),
            on_layer=lambda name: progress.advance(task),
        )


def _write_video(
    target: ReportTarget, settings: ReportSettings, path: Path, steps: int, device: torch.device,
    console: Console,
) -> None:
    from sla2cli.report.sampling import comparison_samples, sla2_label

    with console.status(f"sampling {steps} Euler steps with dense and with SLA2 attention"):
        dense, sparse = comparison_samples(target, settings, steps=steps, device=device, dtype=model_dtype(device))
    write_side_by_side_gif(dense, sparse, path, labels=(DENSE_LABEL, sla2_label(target, settings)))


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
    from sla2cli.report.loading import load_report_target

    settings = ReportSettings(
        sparsity=sparsity, timesteps=parse_timesteps(timesteps), inputs=inputs, resolution=resolution,
        clips=clips, seed=seed, quant=quant.lower(), model_quality=model_quality,
    )
    check_settings(settings)
    check_output_file("--csv", csv, (".csv",))
    check_output_file("--json", json, (".json",))
    check_output_file("--heatmap", heatmap, (".png",))
    check_output_file("--video", video, (".gif",))
    if video_steps < MIN_VIDEO_STEPS:
        raise UserError(f"--video-steps must be at least {MIN_VIDEO_STEPS}, got {video_steps}")
    target_device = resolve_device(device)
    lowbit_mode(settings, target_device)  # a mode this GPU cannot run fails before the model loads
    console = Console()
    with console.status("loading the model", spinner="dots"):
        target = load_report_target(
            model_or_dir, sparsity=sparsity, device=target_device, dtype=model_dtype(target_device), offline=offline
        )
    if video is not None and not target.embedded:
        raise UserError("--video needs a model whose latents can be viewed directly (the embedded model); "
                        "Hub models' latents need their VAE")
    result = _measure(target, settings, target_device, console, quiet)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    title = f"SLA2 report: {target.name} ({len(result.rows)} heads, {result.seconds:.1f} s)"
    render_table(console, result.layer_rows, result.model_row, title=title)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    render_quality(console, result.quality)
    if csv is not None:
        write_csv(result.rows, csv, model_csv_row(result.model_row, result.quality) if result.quality else None)
        console.print(f"wrote {csv}", highlight=False)
    if json is not None:
        write_json(
            report_document(
                result.settings, result.model_row, result.layer_rows, result.rows, result.warnings, result.notes,
                result.quality,
            ),
            json,
        )
        console.print(f"wrote {json}", highlight=False)
    if heatmap is not None:
        write_heatmap(result.rows, heatmap, title=target.name)
        console.print(f"wrote {heatmap}", highlight=False)
    if video is not None:
        _write_video(target, settings, video, video_steps, target_device, console)
        console.print(f"wrote {video} (left: dense attention, right: SLA2)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `sla2 report` and its alias `sla2 sparsity-report`."""
    app.command("report", help=HELP)(report)
    app.command("sparsity-report", help="Alias of `sla2 report`.")(report)
