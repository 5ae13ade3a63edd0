"""`sla2 calibrate`'s job: check the request, load the checkpoint frozen, capture and calibrate every converted
layer (`calibration`), show the results (`calibration_output`) and write the calibrated checkpoint.

Every check runs before the model loads, so a mistake costs nothing and leaves nothing half-written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from sla2cli import api
from sla2cli.checkpoint.format import CONFIG_FILE, CheckpointConfig, read_config
from sla2cli.devices import model_dtype, resolve_device
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder
from sla2cli.integration.recipes import get_recipe
from sla2cli.progress import progress_bar
from sla2cli.report.inputs import family_inputs, forward_inputs
from sla2cli.report.loading import load_report_target
from sla2cli.report.runner import (
    CHUNK_ELEMENTS,
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
    check_calibration_settings,
    collect_calls,
    summary_measurements,
)
from sla2cli.training.calibration_output import render_results, results_title


@dataclass(frozen=True)
class CalibrationRequest:
    """What the user asked for; None takes the default from the checkpoint's recipe."""

    checkpoint: Path
    out: Path | None = None
    overwrite: bool = False
    train_router: bool = True
    router_steps: int | None = None
    router_learning_rate: float | None = None
    alpha_steps: int | None = None
    alpha_learning_rate: float | None = None
    tau: float | None = None
    timesteps: str | None = None
    clips: int | None = None
    inputs: Path | None = None
    resolution: str | None = None
    device: str = "auto"
    seed: int = 0
    quiet: bool = False


@dataclass(frozen=True)
class CalibrationPlan:
    """A checked request: the checkpoint's config, the fit and input settings, where to write, the device."""

    config: CheckpointConfig
    settings: CalibrationSettings
    inputs: ReportSettings
    destination: Path
    device: torch.device


@dataclass(frozen=True)
class CalibrationOutcome:
    """Per-layer results, the model's name, the seconds loading and calibration took, where it was written."""

    model: str
    results: list[LayerResult]
    seconds: float
    destination: Path


def output_folder(checkpoint: Path, out: Path | None, overwrite: bool) -> Path:
    """--out, or the checkpoint itself with --overwrite; refuse to replace anything without --overwrite."""
    if out is None:
        if not overwrite:
            raise UserError("give --out FOLDER for the calibrated checkpoint, or --overwrite to update it in place")
        out = checkpoint
    return check_output_folder(out, overwrite=overwrite)


def read_checkpoint_config(checkpoint: Path) -> CheckpointConfig:
    """The checkpoint's config (its recipe gives the defaults), or a one-line error for any other folder."""
    if not (checkpoint / CONFIG_FILE).is_file():
        raise UserError(
            f"{checkpoint} is not an SLA2 checkpoint folder (no {CONFIG_FILE}); "
            f"create one with: sla2 convert MODEL --out {checkpoint}"
        )
    return read_config(checkpoint)


def plan_calibration(request: CalibrationRequest) -> CalibrationPlan:
    """Every check of the request, in the order the options are most likely wrong; nothing is loaded."""
    timesteps = parse_timesteps(request.timesteps) if request.timesteps is not None else None
    config = read_checkpoint_config(request.checkpoint)
    recipe = get_recipe(config.recipe)
    settings = CalibrationSettings.from_recipe(
        recipe, router_steps=request.router_steps, router_learning_rate=request.router_learning_rate,
        alpha_steps=request.alpha_steps, alpha_learning_rate=request.alpha_learning_rate, tau=request.tau,
        train_router=request.train_router,
    )
    check_calibration_settings(settings)
    inputs = ReportSettings(
        timesteps=timesteps or recipe.calibration.timesteps, inputs=request.inputs, resolution=request.resolution,
        clips=request.clips, seed=request.seed,
    )
    check_settings(inputs)
    destination = output_folder(request.checkpoint, request.out, request.overwrite)
    device = resolve_device(request.device)
    settings = replace(settings, max_chunk_elements=CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]))
    if request.clips is None and request.inputs is None:
        inputs = replace(inputs, clips=recipe.calibration.clips)
    return CalibrationPlan(config, settings, inputs, destination, device)


def load_frozen_target(checkpoint: Path, device: torch.device) -> ReportTarget:
    """The checkpoint's model(s), every weight frozen: calibration trains copies of the layers' own parameters."""
    target = load_report_target(str(checkpoint), sparsity=None, device=device, dtype=model_dtype(device))
    for model in target.components.values():
        model.requires_grad_(False)
    return target


def calibrate_target(target: ReportTarget, plan: CalibrationPlan, console: Console, quiet: bool) -> list[LayerResult]:
    """Capture q, k, v at every converted layer on the sample inputs, then calibrate each layer that was called."""
    keyed = converted_layers(target)
    layers = {f"{component}:{module}": layer for (component, module), layer in keyed.items()}
    if not layers:
        raise UserError(f"{target.name} has no SLA2 layers; convert it first with sla2 convert")
    adapter = family_inputs(target.main, target.recipe)
    samples, warnings = clean_samples(target, adapter, plan.inputs, calibration=True)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    forwards = forward_inputs(
        adapter, samples, plan.inputs.timesteps, seed=plan.inputs.seed, device=plan.device,
        dtype=model_dtype(plan.device),
    )
    models = list(target.components.values())
    with progress_bar(console, enabled=not quiet) as progress:
        task = progress.add_task("capturing q, k, v", total=len(forwards) * len(models))
        calls = collect_calls(models, layers, forwards, on_forward=lambda: progress.advance(task))
        progress.remove_task(task)
        called = [name for name in layers if calls[name]]
        if not called:
            raise UserError(f"no SLA2 layer of {target.name} was called; its attention processors are not SLA2")
        task = progress.add_task("calibrating layers", total=len(called) * plan.settings.steps_per_layer())
        results = calibrate_layers(layers, calls, plan.settings, on_step=lambda: progress.advance(task))
    missing = len(layers) - len(called)
    if missing:
        console.print(f"[yellow]warning:[/] {missing} converted layer(s) were never called; left as they were")
    return results


def run_calibration_job(request: CalibrationRequest, console: Console) -> CalibrationOutcome:
    """Check, load, calibrate, print the table, write the checkpoint (atomically) with the figures in its card."""
    plan = plan_calibration(request)
    started = time.perf_counter()
    with console.status("loading the model", spinner="dots"):
        target = load_frozen_target(request.checkpoint, plan.device)
    results = calibrate_target(target, plan, console, request.quiet)
    seconds = time.perf_counter() - started
    render_results(console, results, results_title(target.name, plan.settings, seconds))
    measurements = {**plan.config.measurements, **summary_measurements(results, plan.settings)}
    shown = request.out or request.checkpoint
    with console.status(f"writing {shown}", spinner="dots"):
        api.save(
            target.components, plan.destination, include_base_weights=plan.config.base_weights == "included",
            overwrite=request.overwrite, measurements=measurements,
        )
    console.print(f"wrote {shown}", highlight=False)
    return CalibrationOutcome(target.name, results, seconds, plan.destination)
