"""`sla2 calibrate`: stage 1 of training. Fit each converted layer's router and alpha against full attention.

The base weights stay frozen; the layers' q, k, v are captured on sample inputs (the embedded model's
calibration clips, never its validation clips; an --inputs file; or random latents), every layer is
fitted on its own (`sla2cli.training.calibration`), and the table shows the hard-routing error (what
inference runs) before, with alpha refitted alone, and with the trained router. Defaults come from the
model's recipe.
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
from rich.table import Table

from sla2cli.checkpoint.format import CheckpointConfig, read_config
from sla2cli.cli.sample_options import (
    DeviceOption,
    InputsOption,
    QuietOption,
    ResolutionOption,
)
from sla2cli.devices import model_dtype, resolve_device
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder
from sla2cli.integration.recipes import get_recipe
from sla2cli.progress import progress_bar
from sla2cli.report.inputs import family_inputs, forward_inputs
from sla2cli.report.runner import (
    CHUNK_ELEMENTS,
    ReportSettings,
    ReportTarget,
    check_settings,
    clean_samples,
    converted_layers,
    parse_timesteps,
)
from sla2cli.sources.folders import SLA2_CONFIG
from sla2cli.sources.locate import EMBEDDED_RECIPE
from sla2cli.training.calibration import (
    ALPHA_ONLY,
    ROUTER_AND_ALPHA,
    CalibrationSettings,
    LayerResult,
    calibrate_layers,
    check_calibration_settings,
    collect_calls,
    summary_measurements,
)

EMBEDDED_DEFAULTS = get_recipe(EMBEDDED_RECIPE).calibration
HELP = (
    "Stage 1 of training: with the model frozen, capture q, k, v at every converted layer on sample inputs "
    "(the embedded model: its calibration clips, not the validation clips sla2 report uses), "
    "then fit each layer's router (W_q, W_k) to keep the key blocks that hold the true softmax mass, and its "
    "alpha predictor to the hard-routing error itself. A layer keeps the best of: its parameters before, alpha "
    "refitted alone, trained router with refitted alpha. Prints the hard-routing error per layer for each and "
    "writes the calibrated checkpoint. Defaults come from the model's recipe."
)


def output_folder(checkpoint: Path, out: Path | None, overwrite: bool) -> Path:
    """--out, or the checkpoint itself with --overwrite; refuse to replace anything without --overwrite."""
    if out is None:
        if not overwrite:
            raise UserError("give --out FOLDER for the calibrated checkpoint, or --overwrite to update it in place")
        out = checkpoint
    return check_output_folder(out, overwrite=overwrite)


def read_checkpoint_config(checkpoint: Path) -> CheckpointConfig:
    """The checkpoint's config (its recipe gives the defaults), or a one-line error for any other folder."""
    if not (checkpoint / SLA2_CONFIG).is_file():
        raise UserError(
            f"{checkpoint} is not an SLA2 checkpoint folder (no {SLA2_CONFIG}); "
            f"create one with: sla2 convert MODEL --out {checkpoint}"
        )
    return read_config(checkpoint)


def _load_target(checkpoint: Path, device: torch.device) -> ReportTarget:
    from sla2cli.report.loading import load_report_target

    target = load_report_target(str(checkpoint), sparsity=None, device=device, dtype=model_dtype(device))
    for model in target.components.values():
        model.requires_grad_(False)
    return target


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
    samples, warnings = clean_samples(target, adapter, inputs, calibration=True)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    forwards = forward_inputs(
        adapter, samples, inputs.timesteps, seed=inputs.seed, device=device, dtype=model_dtype(device)
    )
    models = list(target.components.values())
    with progress_bar(console, enabled=not quiet) as progress:
        task = progress.add_task("capturing q, k, v", total=len(forwards) * len(models))
        calls = collect_calls(models, layers, forwards, on_forward=lambda: progress.advance(task))
        progress.remove_task(task)
        called = [name for name in layers if calls[name]]
        if not called:
            raise UserError(f"no SLA2 layer of {target.name} was called; its attention processors are not SLA2")
        task = progress.add_task("calibrating layers", total=len(called) * settings.steps_per_layer())
        results = calibrate_layers(layers, calls, settings, on_step=lambda: progress.advance(task))
    missing = len(layers) - len(called)
    if missing:
        console.print(f"[yellow]warning:[/] {missing} converted layer(s) were never called; left as they were")
    return results


def _figure(value: float, pattern: str = "{:.4f}") -> str:
    return "-" if math.isnan(value) else pattern.format(value)


KEPT_LABELS = {ALPHA_ONLY: "alpha", ROUTER_AND_ALPHA: "router"}


def render_results(console: Console, results: list[LayerResult], title: str) -> None:
    """One row per layer; the hard-routing error is the figure that matters for inference."""
    single_component = len({result.name.split(":", 1)[0] for result in results}) == 1
    table = Table(title=title, header_style="bold")
    table.add_column("layer", no_wrap=True)
    for header in ("mass", "new", "rel L2", "alpha", "router", "kept"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in results:
        name = result.name.split(":", 1)[1] if single_component else result.name
        table.add_row(
            name,
            _figure(result.mass_before, "{:.3f}"), _figure(result.mass_after, "{:.3f}"),
            _figure(result.rel_l2_before), _marked(result, ALPHA_ONLY), _marked(result, ROUTER_AND_ALPHA),
            _kept(result),
        )
    console.print(table)
    before = sum(r.rel_l2_before for r in results) / len(results)
    after = sum(r.rel_l2_final for r in results) / len(results)
    console.print(f"mean rel L2 {before:.4f} -> {after:.4f} ({after / before:.2f}x)", highlight=False)
    console.print("rel L2: hard-routing SLA2 output vs full attention on the captured q, k, v, per head, averaged "
                  "(what inference runs; `sla2 report` measures it inside the running model), before; alpha: "
                  "alpha refitted, router as it was; router: trained router, alpha refitted; the kept one in green. "
                  "mass: true softmax share inside the kept key blocks, before and with the trained router. kept "
                  "no: neither beat the previous parameters; n/a: every key block is exact.", highlight=False)


def _marked(result: LayerResult, candidate: str) -> str:
    value = result.rel_l2_alpha_only if candidate == ALPHA_ONLY else result.rel_l2_router
    text = _figure(value)
    return f"[green]{text}[/]" if result.choice == candidate else text


def _kept(result: LayerResult) -> str:
    if not result.trained:
        return "n/a"
    return KEPT_LABELS.get(result.choice, "[red]no[/]")


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
    router: Annotated[
        bool,
        typer.Option("--router/--no-router", help="Train the router (W_q, W_k). --no-router fits alpha only and "
                     "keeps the router the checkpoint has (the heuristic one right after sla2 convert)."),
    ] = True,
    router_steps: Annotated[
        int | None,
        typer.Option(help="Adam steps of the router fit per layer (full batch). Default: the recipe's (embedded: "
                     f"{EMBEDDED_DEFAULTS.router_steps}).", show_default=False),
    ] = None,
    router_lr: Annotated[
        float | None,
        typer.Option("--router-lr", help="Learning rate of the router fit. Default: the recipe's (embedded: "
                     f"{EMBEDDED_DEFAULTS.router_learning_rate:g}).", show_default=False),
    ] = None,
    alpha_steps: Annotated[
        int | None,
        typer.Option(help="Adam steps of each alpha fit per layer (full batch). Default: the recipe's (embedded: "
                     f"{EMBEDDED_DEFAULTS.alpha_steps}).", show_default=False),
    ] = None,
    alpha_lr: Annotated[
        float | None,
        typer.Option("--alpha-lr", help="Learning rate of the alpha fit. Default: the recipe's (embedded: "
                     f"{EMBEDDED_DEFAULTS.alpha_learning_rate:g}).", show_default=False),
    ] = None,
    tau: Annotated[
        float | None,
        typer.Option(help="Temperature of the soft top-k the router is trained through (smaller: closer to "
                     f"top-k). Default: the recipe's (embedded: {EMBEDDED_DEFAULTS.tau:g}).", show_default=False),
    ] = None,
    timesteps: Annotated[
        str | None,
        typer.Option(help="Comma-separated noise levels in [0, 1] (1 = pure noise) to capture q, k, v at. "
                     "Default: the recipe's (embedded: "
                     f"{','.join(f'{t:g}' for t in EMBEDDED_DEFAULTS.timesteps)}).", show_default=False),
    ] = None,
    clips: Annotated[
        int | None,
        typer.Option(help="Number of clips to capture (the embedded model's calibration clips, input clips or "
                     f"random draws). Default: the recipe's (embedded: {EMBEDDED_DEFAULTS.clips}); every clip of "
                     "--inputs.", show_default=False),
    ] = None,
    inputs: InputsOption = None,
    resolution: ResolutionOption = None,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the noise and of random inputs.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """Calibrate every converted layer, print the table, save the checkpoint."""
    parsed_timesteps = parse_timesteps(timesteps) if timesteps is not None else None
    config = read_checkpoint_config(checkpoint_dir)
    recipe = get_recipe(config.recipe)
    settings = CalibrationSettings.from_recipe(
        recipe, router_steps=router_steps, router_learning_rate=router_lr, alpha_steps=alpha_steps,
        alpha_learning_rate=alpha_lr, tau=tau, train_router=router,
    )
    check_calibration_settings(settings)
    inputs_settings = ReportSettings(
        timesteps=parsed_timesteps or recipe.calibration.timesteps, inputs=inputs, resolution=resolution,
        clips=clips, seed=seed,
    )
    check_settings(inputs_settings)
    destination = output_folder(checkpoint_dir, out, overwrite)
    target_device = resolve_device(device)
    settings = replace(settings, max_chunk_elements=CHUNK_ELEMENTS.get(target_device.type, CHUNK_ELEMENTS["cuda"]))
    if clips is None and inputs is None:
        inputs_settings = replace(inputs_settings, clips=recipe.calibration.clips)
    console = Console()
    started = time.perf_counter()
    with console.status("loading the model", spinner="dots"):
        target = _load_target(checkpoint_dir, target_device)
    results = _calibrate(target, inputs_settings, settings, target_device, console, quiet)
    seconds = time.perf_counter() - started
    what = f"{settings.router_steps} router + {settings.alpha_steps} alpha steps" if settings.train_router else (
        f"{settings.alpha_steps} alpha steps, router kept"
    )
    render_results(console, results, f"sla2 calibrate: {target.name} ({what} per layer, {seconds:.1f} s)")
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
