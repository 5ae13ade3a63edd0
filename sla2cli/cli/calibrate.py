"""`sla2 calibrate`: stage 1 of training. Fit each converted layer's router and alpha against full attention.

The base weights stay frozen; the layers' q, k, v are captured on sample inputs (the embedded model's
calibration clips, never its validation clips; an --inputs file; or random latents), every layer is
fitted on its own (`sla2cli.training.calibrate_job` runs the job), and the table shows the hard-routing error (what
inference runs) before, with alpha refitted alone, and with the trained router. Defaults come from the
model's recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.cli.sample_options import DeviceOption, InputsOption, QuietOption, ResolutionOption
from sla2cli.integration.recipes import EMBEDDED_RECIPE, get_recipe
from sla2cli.training.calibrate_job import CalibrationRequest, run_calibration_job

EMBEDDED_DEFAULTS = get_recipe(EMBEDDED_RECIPE).calibration
HELP = (
    "Stage 1 of training: with the model frozen, capture q, k, v at every converted layer on sample inputs "
    "(the embedded model: its calibration clips, not the validation clips sla2 report uses), "
    "then fit each layer's router (W_q, W_k) to keep the key blocks that hold the true softmax mass, and its "
    "alpha predictor to the hard-routing error itself. A layer keeps the best of: its parameters before, alpha "
    "refitted alone, trained router with refitted alpha. Prints the hard-routing error per layer for each and "
    "writes the calibrated checkpoint. Defaults come from the model's recipe."
)


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
    request = CalibrationRequest(
        checkpoint=checkpoint_dir, out=out, overwrite=overwrite, train_router=router, router_steps=router_steps,
        router_learning_rate=router_lr, alpha_steps=alpha_steps, alpha_learning_rate=alpha_lr, tau=tau,
        timesteps=timesteps, clips=clips, inputs=inputs, resolution=resolution, device=device, seed=seed,
        quiet=quiet,
    )
    run_calibration_job(request, Console())


def register(app: typer.Typer) -> None:
    """Add `sla2 calibrate`."""
    app.command("calibrate", help=HELP)(calibrate)
