"""`sla2 calibrate`: stage 1 of training. Learn each converted layer's router and alpha against full attention.

The base weights stay frozen; the layers' q, k, v are captured on sample inputs (the embedded model's
validation clips, an --inputs file, or random latents), every layer is trained on its own, and the
table shows the hard-routing error (what inference runs) before and after.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sla2cli.cli.report import model_dtype, resolve_device
from sla2cli.cli.sample_options import (
    DEFAULT_TIMESTEPS_TEXT,
    ClipsOption,
    DeviceOption,
    InputsOption,
    QuietOption,
    ResolutionOption,
    TimestepsOption,
)
from sla2cli.errors import UserError
from sla2cli.models.atomic import check_output_folder
from sla2cli.models.checkpoint_format import read_config
from sla2cli.models.folders import SLA2_CONFIG
from sla2cli.report.inputs import family_inputs, forward_inputs
from sla2cli.report.runner import (
    DEFAULT_CLIPS,
    ReportSettings,
    ReportTarget,
    check_settings,
    clean_samples,
    converted_layers,
    parse_timesteps,
)
from sla2cli.training.calibration import (
    CalibrationSettings,
    LayerResult,
    calibrate_layers,
    collect_calls,
    summary_measurements,
)

HELP = (
    "Stage 1 of training: with the model frozen, capture q, k, v at every converted layer on sample inputs "
    "and train each layer's router (W_q, W_k) and alpha predictor with soft routing against full attention. "
    "Prints the soft loss and the hard-routing relative error per layer before and after, and writes the "
    "calibrated checkpoint."
)
DEFAULT_SETTINGS = CalibrationSettings()


def check_calibration_settings(settings: CalibrationSettings) -> None:
    """User mistakes in the training options, found before loading anything."""
    if settings.steps < 1:
        raise UserError(f"--steps must be at least 1, got {settings.steps}")
    if not (math.isfinite(settings.learning_rate) and settings.learning_rate > 0):
        raise UserError(f"--lr must be a positive number (e.g. 1e-4), got {settings.learning_rate}")
    if settings.query_blocks < 1:
        raise UserError(f"--query-blocks must be at least 1, got {settings.query_blocks}")
    if not (math.isfinite(settings.tau) and settings.tau > 0):
        raise UserError(f"--tau must be a positive number (e.g. 0.1), got {settings.tau}")


def output_folder(checkpoint: Path, out: Path | None, overwrite: bool) -> Path:
    """--out, or the checkpoint itself with --overwrite; refuse to replace anything without --overwrite."""
    if out is None:
        if not overwrite:
            raise UserError("give --out FOLDER for the calibrated checkpoint, or --overwrite to update it in place")
        out = checkpoint
    return check_output_folder(out, overwrite=overwrite)


def _load_target(checkpoint: Path, device: torch.device) -> ReportTarget:
    from sla2cli.report.loading import load_report_target

    if not (checkpoint / SLA2_CONFIG).is_file():
        raise UserError(
            f"{checkpoint} is not an SLA2 checkpoint folder (no {SLA2_CONFIG}); "
            f"create one with: sla2 convert MODEL --out {checkpoint}"
        )
    target = load_report_target(str(checkpoint), sparsity=None, device=device, dtype=model_dtype(device))
    for model in target.components.values():
        model.requires_grad_(False)
    return target


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )


def _calibrate(
    target: ReportTarget,
    inputs: ReportSettings,
    settings: CalibrationSettings,
    device: torch.device,
    console: Console,
    quiet: bool,
) -> list[LayerResult]:
    keyed = converted_layers(target)
    layers = {f"{component}:{module}": layer for (component, module), layer in keyed.items()}
    if not layers:
        raise UserError(f"{target.name} has no SLA2 layers; convert it first with sla2 convert")
    adapter = family_inputs(target.main, target.recipe)
    samples, warnings = clean_samples(target, adapter, inputs)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    forwards = forward_inputs(
        adapter, samples, inputs.timesteps, seed=inputs.seed, device=device, dtype=model_dtype(device)
    )
    models = list(target.components.values())
    with _progress(console, quiet) as progress:
        task = progress.add_task("capturing q, k, v", total=len(forwards) * len(models))
        calls = collect_calls(models, layers, forwards, on_forward=lambda: progress.advance(task))
        progress.remove_task(task)
        called = [name for name in layers if calls[name]]
        if not called:
            raise UserError(f"no SLA2 layer of {target.name} was called; its attention processors are not SLA2")
        task = progress.add_task("calibrating layers", total=len(called) * settings.steps)
        results = calibrate_layers(layers, calls, settings, on_step=lambda: progress.advance(task))
    missing = len(layers) - len(called)
    if missing:
        console.print(f"[yellow]warning:[/] {missing} converted layer(s) were never called; left as they were")
    return results


def render_results(console: Console, results: list[LayerResult], title: str) -> None:
    """One row per layer; the hard-routing error is the figure that matters for inference."""
    single_component = len({result.name.split(":", 1)[0] for result in results}) == 1
    table = Table(title=title, header_style="bold")
    table.add_column("layer", no_wrap=True)
    for header in ("soft before", "soft after", "rel L2 before", "rel L2 after", "change", "kept"):
        table.add_column(header, justify="right")
    for result in results:
        change = result.rel_l2_after - result.rel_l2_before
        colour = "green" if change <= 0 else "red"
        name = result.name.split(":", 1)[1] if single_component else result.name
        table.add_row(
            name,
            f"{result.soft_loss_before:.2e}", f"{result.soft_loss_after:.2e}",
            f"{result.rel_l2_before:.4f}", f"{result.rel_l2_after:.4f}",
            f"[{colour}]{change:+.4f}[/]",
            _kept(result),
        )
    console.print(table)
    console.print("rel L2: hard-routing SLA2 output vs full attention on the captured q, k, v (what inference "
                  "runs); soft: the training objective on fixed query blocks. kept: no means the rel L2 rose, so the "
                  "layer keeps its previous parameters; n/a: every key block is exact, nothing to train.",
                  highlight=False)


def _kept(result: LayerResult) -> str:
    if not result.trained:
        return "n/a"
    return "yes" if result.kept else "[red]no[/]"


def calibrate(
    checkpoint_dir: Annotated[
        Path,
        typer.Argument(help="SLA2 checkpoint folder written by sla2 convert.", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the calibrated checkpoint. Default: none; pass --overwrite to update "
                     "CHECKPOINT_DIR in place.", show_default=False),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it exists (or CHECKPOINT_DIR without --out); a folder "
                     "holding files sla2 did not write is never replaced."),
    ] = False,
    steps: Annotated[int, typer.Option(help="Adam steps per layer.")] = DEFAULT_SETTINGS.steps,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = DEFAULT_SETTINGS.learning_rate,
    query_blocks: Annotated[
        int, typer.Option(help="Random query blocks (of 128 rows) per step, each against all keys.")
    ] = DEFAULT_SETTINGS.query_blocks,
    timesteps: TimestepsOption = DEFAULT_TIMESTEPS_TEXT,
    clips: ClipsOption = None,
    inputs: InputsOption = None,
    resolution: ResolutionOption = None,
    tau: Annotated[float, typer.Option(help="Temperature of the soft router (smaller: closer to top-k).")] = (
        DEFAULT_SETTINGS.tau
    ),
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the noise, of random inputs and of the training draws.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """Calibrate every converted layer, print the table, save the checkpoint."""
    settings = CalibrationSettings(steps=steps, learning_rate=lr, query_blocks=query_blocks, tau=tau, seed=seed)
    check_calibration_settings(settings)
    inputs_settings = ReportSettings(
        timesteps=parse_timesteps(timesteps), inputs=inputs, resolution=resolution, clips=clips, seed=seed
    )
    check_settings(inputs_settings)
    destination = output_folder(checkpoint_dir, out, overwrite)
    target_device = resolve_device(device)
    if clips is None and inputs is None:
        inputs_settings = replace(inputs_settings, clips=DEFAULT_CLIPS.get(target_device.type, DEFAULT_CLIPS["cuda"]))
    console = Console()
    started = time.perf_counter()
    with console.status("loading the model", spinner="dots"):
        target = _load_target(checkpoint_dir, target_device)
        config = read_config(checkpoint_dir)
    results = _calibrate(target, inputs_settings, settings, target_device, console, quiet)
    seconds = time.perf_counter() - started
    render_results(console, results, f"sla2 calibrate: {target.name} ({settings.steps} steps per layer, "
                   f"{seconds:.1f} s)")
    from sla2cli import api

    measurements = {**config.measurements, **summary_measurements(results, settings)}
    shown = out or checkpoint_dir
    with console.status(f"writing {shown}", spinner="dots"):
        api.save(
            target.components, destination, include_base_weights=config.base_weights == "included",
            overwrite=overwrite, measurements=measurements,
        )
    console.print(f"wrote {shown}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `sla2 calibrate`."""
    app.command("calibrate", help=HELP)(calibrate)
