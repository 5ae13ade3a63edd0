"""`sla2 report`'s job: check the request, load the converted model, measure every converted layer against
full attention (`runner`), print the tables and write the files asked for (`output`, `sampling`).

Every check, including whether the GPU runs the low-bit mode asked for, comes before the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from sla2cli.devices import model_dtype, resolve_device
from sla2cli.errors import UserError
from sla2cli.files import check_output_file
from sla2cli.ops.quantization import QUANT_AUTO
from sla2cli.ops.validation import check_positive_int
from sla2cli.progress import progress_bar
from sla2cli.report.loading import load_report_target
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
    DEFAULT_TIMESTEPS_TEXT,
    ReportResult,
    ReportSettings,
    ReportTarget,
    check_settings,
    lowbit_mode,
    parse_timesteps,
    run_report,
)
from sla2cli.report.sampling import comparison_samples, sla2_label

DEFAULT_VIDEO_STEPS = 8
DENSE_LABEL = "dense attention"


@dataclass(frozen=True)
class ReportRequest:
    """What the user asked for; model_or_dir None is the embedded model, sparsity None each layer's own."""

    model_or_dir: str | None = None
    sparsity: float | None = None
    inputs: Path | None = None
    timesteps: str = DEFAULT_TIMESTEPS_TEXT
    resolution: str | None = None
    clips: int | None = None
    csv: Path | None = None
    json: Path | None = None
    heatmap: Path | None = None
    video: Path | None = None
    video_steps: int = DEFAULT_VIDEO_STEPS
    quant: str = QUANT_AUTO
    model_quality: bool = True
    device: str = "auto"
    seed: int = 0
    offline: bool = False
    quiet: bool = False


def plan_report(request: ReportRequest) -> tuple[ReportSettings, torch.device]:
    """Every check of the request; the settings to measure with and the device."""
    settings = ReportSettings(
        sparsity=request.sparsity, timesteps=parse_timesteps(request.timesteps), inputs=request.inputs,
        resolution=request.resolution, clips=request.clips, seed=request.seed, quant=request.quant.lower(),
        model_quality=request.model_quality,
    )
    check_settings(settings)
    check_output_file("--csv", request.csv, (".csv",))
    check_output_file("--json", request.json, (".json",))
    check_output_file("--heatmap", request.heatmap, (".png",))
    check_output_file("--video", request.video, (".gif",))
    check_positive_int(request.video_steps, "--video-steps")
    device = resolve_device(request.device)
    lowbit_mode(settings, device)  # a mode this GPU cannot run fails before the model loads
    return settings, device


def measure(
    target: ReportTarget, settings: ReportSettings, device: torch.device, console: Console, quiet: bool
) -> ReportResult:
    """Run the report with a bar counting the layers measured."""
    with progress_bar(console) as progress:
        task = progress.add_task("layers measured", total=None, visible=not quiet)
        return run_report(
            target, settings, device=device, dtype=model_dtype(device),
            on_start=lambda total: progress.update(task, total=total),
            on_layer=lambda name: progress.advance(task),
        )


def write_video(
    target: ReportTarget, settings: ReportSettings, path: Path, steps: int, device: torch.device, console: Console
) -> None:
    """A GIF of a dense sample beside the SLA2 sample from the same noise, each half labelled."""
    with console.status(f"sampling {steps} Euler steps with dense and with SLA2 attention"):
        dense, sparse = comparison_samples(target, settings, steps=steps, device=device, dtype=model_dtype(device))
    write_side_by_side_gif(dense, sparse, path, labels=(DENSE_LABEL, sla2_label(target, settings)))


def print_result(console: Console, target: ReportTarget, result: ReportResult) -> None:
    """Warnings, the per-layer table with the model line, notes and the model-level quality."""
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    title = f"SLA2 report: {target.name} ({len(result.rows)} heads, {result.seconds:.1f} s)"
    render_table(console, result.layer_rows, result.model_row, title=title)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    render_quality(console, result.quality)


def write_files(console: Console, request: ReportRequest, target: ReportTarget, result: ReportResult) -> None:
    """The CSV, JSON and heatmap asked for, each written atomically and announced."""
    if request.csv is not None:
        quality_row = model_csv_row(result.model_row, result.quality) if result.quality else None
        write_csv(result.rows, request.csv, quality_row)
        console.print(f"wrote {request.csv}", highlight=False)
    if request.json is not None:
        write_json(
            report_document(
                result.settings, result.model_row, result.layer_rows, result.rows, result.warnings, result.notes,
                result.quality,
            ),
            request.json,
        )
        console.print(f"wrote {request.json}", highlight=False)
    if request.heatmap is not None:
        write_heatmap(result.rows, request.heatmap, title=target.name)
        console.print(f"wrote {request.heatmap}", highlight=False)


def run_report_job(request: ReportRequest, console: Console) -> ReportResult:
    """Check, load, measure, print, write; the result for callers that want the numbers."""
    settings, device = plan_report(request)
    with console.status("loading the model", spinner="dots"):
        target = load_report_target(
            request.model_or_dir, sparsity=request.sparsity, device=device, dtype=model_dtype(device),
            offline=request.offline,
        )
    if request.video is not None and not target.embedded:
        raise UserError("--video needs a model whose latents can be viewed directly (the embedded model); "
                        "Hub models' latents need their VAE")
    result = measure(target, settings, device, console, request.quiet)
    print_result(console, target, result)
    write_files(console, request, target, result)
    if request.video is not None:
        write_video(target, settings, request.video, request.video_steps, device, console)
        console.print(f"wrote {request.video} (left: dense attention, right: SLA2)", highlight=False)
    return result
