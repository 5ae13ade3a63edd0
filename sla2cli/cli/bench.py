"""`sla2 bench`: SLA2 against FlashAttention2 and its peers, per kernel or per model forward."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.bench.cases import (
    CPU_DEFAULT_SHAPES,
    DEFAULT_SPARSITIES,
    GPU_DEFAULT_SHAPES,
    MODES,
    check_mode,
    parse_shape,
    unique,
)
from sla2cli.bench.checks import KernelMismatch
from sla2cli.bench.environment import Environment, describe
from sla2cli.bench.kernel_mode import KernelBenchPlan, run_kernel_bench
from sla2cli.bench.model_mode import ModelBenchPlan
from sla2cli.bench.output import print_report, report_console, write_csv, write_json
from sla2cli.bench.plot import write_plot
from sla2cli.bench.providers import provider_names, select_providers
from sla2cli.bench.records import FAILED, Measurement
from sla2cli.bench.timing import TimingPlan
from sla2cli.devices import resolve_device, resolve_dtype
from sla2cli.errors import UserError
from sla2cli.files import check_output_file
from sla2cli.ops.validation import check_sparsity
from sla2cli.progress import StepProgress, progress_bar

GPU_WARMUP, CPU_WARMUP = 3, 1
GPU_TIME_BUDGET_S = 10.0
CPU_TIME_BUDGET_S = 1.0  # CPU numbers are indicative only; keep the run short

HELP = (
    "Time SLA2 against FlashAttention2, cuDNN, FlexAttention, SageAttention and flash-attn.\n\n"
    "Kernel mode (default): one attention call per provider, shape, sparsity and mode. Every provider's "
    "output (and gradients in fwd+bwd) is checked against a float32 reference before it is timed; a "
    "mismatch stops the run. Times are medians of many repeats (CUDA events, L2 flushed between repeats).\n\n"
    "Model mode (--model): one transformer forward (or training step) with dense attention, then with "
    "SLA2, same weights and inputs.\n\n"
    "On a CPU the numbers come from the PyTorch path at small shapes and are not GPU numbers."
)


def _write_outputs(
    console: Console,
    rows: list[Measurement],
    csv: Path | None,
    json: Path | None,
    plot: Path | None,
    on_cpu: bool,
) -> None:
    if csv is not None:
        write_csv(rows, csv)
        console.print(f"wrote {csv}", highlight=False)
    if json is not None:
        write_json(rows, json)
        console.print(f"wrote {json}", highlight=False)
    if plot is not None:
        write_plot(rows, plot, cpu_numbers=on_cpu)
        console.print(f"wrote {plot}", highlight=False)


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
        min=0, help="Untimed calls before timing each case. Default: 3 on GPU, 1 on CPU."
    )] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per case (the median is reported).")] = 20,
    time_budget: Annotated[float | None, typer.Option(
        min=0.0, help="Seconds of timed calls per case: slow cases use fewer repeats (never fewer than 5). "
        "Default: 10 on GPU, 1 on CPU.",
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
    check_output_file("--csv", csv, (".csv",))
    check_output_file("--json", json, (".json",))
    check_output_file("--plot", plot, (".png",))
    console = report_console()
    target = resolve_device(device)
    precision = resolve_dtype(dtype, target)
    levels = [check_sparsity(s, "--sparsity") for s in unique(sparsity or [])]
    if warmup is None:
        warmup = GPU_WARMUP if target.type == "cuda" else CPU_WARMUP
    if time_budget is None:
        time_budget = GPU_TIME_BUDGET_S if target.type == "cuda" else CPU_TIME_BUDGET_S
    timing = TimingPlan(warmup=warmup, repeats=repeats, budget_s=time_budget)
    if model is not None:
        if shape or provider or mode:
            raise UserError("--shape, --provider and --mode belong to kernel mode; drop them with --model")
        model_plan = ModelBenchPlan(
            model=model, resolution=resolution, frames=frames, random_weights=random_weights,
            scaled_down=scaled_down, train_step=train_step, sparsity=levels[0] if levels else None,
            dtype=precision, device=target, timing=timing, seed=seed,
        )
        rows, environment, title = _run_model_mode(model_plan)
    else:
        model_only = [
            name for name, given in (
                ("--resolution", resolution is not None), ("--frames", frames is not None),
                ("--random-weights", random_weights), ("--scaled-down", scaled_down), ("--train-step", train_step),
            ) if given
        ]
        if model_only:
            raise UserError(f"{', '.join(model_only)} belong to model mode; add --model MODEL_OR_DIR")
        shapes = [parse_shape(s) for s in unique(shape or [])]
        kernel_plan = KernelBenchPlan(
            shapes=shapes or list(GPU_DEFAULT_SHAPES if target.type == "cuda" else CPU_DEFAULT_SHAPES),
            sparsities=levels or list(DEFAULT_SPARSITIES),
            modes=[check_mode(m) for m in unique(mode or list(MODES))],
            providers=select_providers(provider),
            dtype=precision,
            device=target,
            timing=timing,
            seed=seed,
        )
        rows, environment, title = _run_kernel_mode(kernel_plan)
    print_report(console, rows, environment, title)
    _write_outputs(console, rows, csv, json, plot, on_cpu=target.type != "cuda")
    failed = sorted({row.provider for row in rows if row.status == FAILED})
    ours = [name for name in failed if name.startswith("sla2")]
    peers = [name for name in failed if not name.startswith("sla2")]
    stderr = Console(stderr=True, soft_wrap=True)
    if peers:  # a peer that cannot run here (e.g. a compile failure in its library) is not our failure
        stderr.print(f"[bold yellow]warning:[/] {', '.join(peers)} raised errors (see their rows)", highlight=False)
    if ours:
        stderr.print(f"[bold red]error:[/] {', '.join(ours)} raised errors (see their rows)", highlight=False)
        raise SystemExit(1)


@contextmanager
def _failing_on_mismatch() -> Iterator[None]:
    """A wrong kernel ends the command with one line and exit code 1 (it is not a usage mistake)."""
    try:
        yield
    except KernelMismatch as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def _run_kernel_mode(plan: KernelBenchPlan) -> tuple[list[Measurement], Environment, str]:
    environment = describe(plan.device)
    with _failing_on_mismatch(), progress_bar(Console(stderr=True)) as progress:
        rows = run_kernel_bench(plan, environment, StepProgress(progress, plan.size))
    return rows, environment, "sla2 bench: kernels"


def _run_model_mode(plan: ModelBenchPlan) -> tuple[list[Measurement], Environment, str]:
    from sla2cli.bench.model_mode import run_model_bench

    environment = describe(plan.device)
    with _failing_on_mismatch(), progress_bar(Console(stderr=True)) as progress:
        rows = run_model_bench(plan, environment, StepProgress(progress, None))
    return rows, environment, f"sla2 bench: model {plan.model}"


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP)(bench)
