"""`sla2 bench`: SLA2 against FlashAttention2 and its peers, per kernel or per model forward (`sla2cli.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sla2cli.bench.cases import MODES
from sla2cli.bench.job import (
    CPU_TIME_BUDGET_S,
    CPU_WARMUP,
    GPU_TIME_BUDGET_S,
    GPU_WARMUP,
    BenchRequest,
    run_bench_job,
)
from sla2cli.bench.providers import provider_names
from sla2cli.bench.timing import MIN_REPEATS, MIN_REPEATS_SLOW

HELP = (
    "Time SLA2 against FlashAttention2, cuDNN, FlexAttention, SageAttention and flash-attn.\n\n"
    "Kernel mode (default): one attention call per provider, shape, sparsity and mode. Every provider's "
    "output (and gradients in fwd+bwd) is checked against a float32 reference before it is timed; a "
    "mismatch stops the run. Times are medians of many repeats (CUDA events, L2 flushed between repeats).\n\n"
    "Model mode (--model): one transformer forward (or training step) with dense attention, then with "
    "SLA2, same weights and inputs.\n\n"
    "On a CPU the numbers come from the PyTorch path at small shapes and are not GPU numbers."
)


def bench(
    shape: Annotated[list[str] | None, typer.Option(
        "--shape", metavar="B,H,L,D",
        help="Attention shape (batch, heads, tokens, head dim 64 or 128); repeat for several. "
        "Default on GPU: 1,12,32760,128 and 1,40,75600,128; on CPU: 1,2,2048,64 and 1,2,4096,128.",
    )] = None,
    sparsity: Annotated[list[float] | None, typer.Option(
        "--sparsity", metavar="FLOAT",
        help="Share of key blocks sent to the linear branch, in [0, 1); repeat for several. "
        "Default: 0.90, 0.95, 0.97. Model mode uses the first value (default: the model's own).",
    )] = None,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", metavar="fwd|fwd+bwd",
        help=f"What is timed: {' or '.join(MODES)} (forward plus backward); repeat for both. Default: both.",
    )] = None,
    provider: Annotated[list[str] | None, typer.Option(
        "--provider", metavar="NAME",
        help=f"Provider to time; repeat for several. One of: {', '.join(provider_names())}. "
        "Default: all (those not installed or not usable here get a skipped row). Speedups need fa2.",
    )] = None,
    dtype: Annotated[str, typer.Option(
        metavar="auto|bf16|fp16|fp32", help="Input dtype: bf16, fp16, fp32, or auto (bf16 on GPU, fp32 on CPU)."
    )] = "auto",
    device: Annotated[str, typer.Option(
        metavar="auto|cuda|cpu", help="auto (CUDA when present), cuda or cpu."
    )] = "auto",
    warmup: Annotated[int | None, typer.Option(
        min=0, help="Untimed calls before timing each case (fewer once they have taken --time-budget seconds). "
        f"Default: {GPU_WARMUP} on GPU, {CPU_WARMUP} on CPU."
    )] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per case (the median is reported).")] = 20,
    time_budget: Annotated[float | None, typer.Option(
        min=0.0, help="Seconds of timed calls per case: slow cases use fewer repeats (never fewer than "
        f"{MIN_REPEATS}; {MIN_REPEATS_SLOW} for a call longer than the whole budget). "
        f"Default: {GPU_TIME_BUDGET_S:g} on GPU, {CPU_TIME_BUDGET_S:g} on CPU.",
    )] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    csv: Annotated[Path | None, typer.Option(help="Write one CSV row per measurement to this file.")] = None,
    json: Annotated[Path | None, typer.Option(help="Write the rows as a JSON list to this file.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write a PNG of speedup vs sparsity per provider and shape (median ms where FA2 is absent)."
    )] = None,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="MODEL_OR_DIR",
        help="Model mode: a Hub id, a converted or original model folder, or a recipe name with "
        "--random-weights.",
    )] = None,
    resolution: Annotated[str | None, typer.Option(
        metavar="NAME|HxW",
        help="Model mode: a resolution of the model's recipe (480p or 720p for Wan) or HEIGHTxWIDTH in "
        "pixels. Default: the recipe's (480p for Wan).",
    )] = None,
    frames: Annotated[int | None, typer.Option(
        min=1, help="Model mode: video frames. Default: the recipe's (81 for Wan)."
    )] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights",
        help="Model mode: build the model's architecture with random weights (no download).",
    )] = False,
    scaled_down: Annotated[bool, typer.Option(
        "--scaled-down",
        help="Model mode, with --random-weights: the recipe's model classes at tiny widths and 2 layers. "
        "Checks the whole path quickly on any machine; its times say nothing about the full model.",
    )] = False,
    train_step: Annotated[bool, typer.Option(
        "--train-step", help="Model mode: also time forward+backward (a training step without the optimizer)."
    )] = False,
) -> None:
    request = BenchRequest(
        shapes=tuple(shape or ()), sparsities=tuple(sparsity or ()), modes=tuple(mode or ()),
        providers=tuple(provider or ()), dtype=dtype, device=device, warmup=warmup, repeats=repeats,
        time_budget=time_budget, seed=seed, csv=csv, json=json, plot=plot, model=model, resolution=resolution,
        frames=frames, random_weights=random_weights, scaled_down=scaled_down, train_step=train_step,
    )
    code = run_bench_job(request)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `sla2 bench`."""
    app.command("bench", help=HELP)(bench)
