"""`sla2 bench`'s job: check the options, plan kernel mode or model mode, run it with a progress bar, print
the table, write the files asked for, and say which providers failed.

The exit code is the command's: 0, or 1 when one of SLA2's own providers raised or a kernel's output did
not match the reference (a wrong kernel, not a usage mistake; usage mistakes are UserErrors, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from sla2cli.bench.cases import (
    CPU_DEFAULT_SHAPES,
    GPU_DEFAULT_SHAPES,
    MODES,
    check_mode,
    parse_shape,
    unique,
)
from sla2cli.bench.checks import KernelMismatch
from sla2cli.bench.environment import describe
from sla2cli.bench.kernel_mode import KernelBenchPlan, run_kernel_bench
from sla2cli.bench.model_mode import ModelBenchPlan, run_model_bench
from sla2cli.bench.output import print_report, report_console, write_csv, write_json
from sla2cli.bench.plot import write_plot
from sla2cli.bench.providers import select_providers
from sla2cli.bench.records import FAILED, Measurement
from sla2cli.bench.timing import TimingPlan
from sla2cli.devices import resolve_device, resolve_dtype
from sla2cli.errors import UserError
from sla2cli.files import check_output_file
from sla2cli.ops.geometry import DEFAULT_SPARSITIES
from sla2cli.ops.validation import check_sparsity
from sla2cli.progress import StepProgress, progress_bar

GPU_WARMUP, CPU_WARMUP = 3, 1
GPU_TIME_BUDGET_S = 10.0
CPU_TIME_BUDGET_S = 1.0  # CPU numbers are indicative only; keep the run short
FAILED_EXIT_CODE = 1  # a wrong kernel or a failing SLA2 provider; usage mistakes exit with 2


@dataclass(frozen=True)
class BenchRequest:
    """The command's options as typed; None and empty lists take the defaults of the device."""

    shapes: tuple[str, ...] = ()
    sparsities: tuple[float, ...] = ()
    modes: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    dtype: str = "auto"
    device: str = "auto"
    warmup: int | None = None
    repeats: int = 20
    time_budget: float | None = None
    seed: int = 0
    csv: Path | None = None
    json: Path | None = None
    plot: Path | None = None
    model: str | None = None
    resolution: str | None = None
    frames: int | None = None
    random_weights: bool = False
    scaled_down: bool = False
    train_step: bool = False


def plan_bench(request: BenchRequest) -> KernelBenchPlan | ModelBenchPlan:
    """Every check of the options (output files first), and the plan of the mode they ask for."""
    check_output_file("--csv", request.csv, (".csv",))
    check_output_file("--json", request.json, (".json",))
    check_output_file("--plot", request.plot, (".png",))
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    levels = [check_sparsity(s, "--sparsity") for s in unique(list(request.sparsities))]
    on_gpu = device.type == "cuda"
    timing = TimingPlan(
        warmup=request.warmup if request.warmup is not None else (GPU_WARMUP if on_gpu else CPU_WARMUP),
        repeats=request.repeats,
        budget_s=request.time_budget if request.time_budget is not None else (
            GPU_TIME_BUDGET_S if on_gpu else CPU_TIME_BUDGET_S
        ),
    )
    if request.model is not None:
        if request.shapes or request.providers or request.modes:
            raise UserError("--shape, --provider and --mode belong to kernel mode; drop them with --model")
        return ModelBenchPlan(
            model=request.model, resolution=request.resolution, frames=request.frames,
            random_weights=request.random_weights, scaled_down=request.scaled_down, train_step=request.train_step,
            sparsity=levels[0] if levels else None, dtype=dtype, device=device, timing=timing, seed=request.seed,
        )
    model_only = [
        name for name, given in (
            ("--resolution", request.resolution is not None), ("--frames", request.frames is not None),
            ("--random-weights", request.random_weights), ("--scaled-down", request.scaled_down),
            ("--train-step", request.train_step),
        ) if given
    ]
    if model_only:
        raise UserError(f"{', '.join(model_only)} belong to model mode; add --model MODEL_OR_DIR")
    shapes = [parse_shape(s) for s in unique(list(request.shapes))]
    return KernelBenchPlan(
        shapes=shapes or list(GPU_DEFAULT_SHAPES if on_gpu else CPU_DEFAULT_SHAPES),
        sparsities=levels or list(DEFAULT_SPARSITIES),
        modes=[check_mode(m) for m in unique(list(request.modes) or list(MODES))],
        providers=select_providers(list(request.providers) or None),
        dtype=dtype,
        device=device,
        timing=timing,
        seed=request.seed,
    )


def write_outputs(console: Console, rows: list[Measurement], request: BenchRequest, on_cpu: bool) -> None:
    """The files asked for, each written atomically, each announced."""
    if request.csv is not None:
        write_csv(rows, request.csv)
        console.print(f"wrote {request.csv}", highlight=False)
    if request.json is not None:
        write_json(rows, request.json)
        console.print(f"wrote {request.json}", highlight=False)
    if request.plot is not None:
        write_plot(rows, request.plot, cpu_numbers=on_cpu)
        console.print(f"wrote {request.plot}", highlight=False)


def failure_exit_code(rows: list[Measurement], stderr: Console) -> int:
    """Name the providers whose rows failed: a peer that cannot run here (e.g. a compile failure in its library)
    is a warning, one of SLA2's own an error with exit code 1."""
    failed = sorted({row.provider for row in rows if row.status == FAILED})
    ours = [name for name in failed if name.startswith("sla2")]
    peers = [name for name in failed if not name.startswith("sla2")]
    if peers:
        stderr.print(f"[bold yellow]warning:[/] {', '.join(peers)} raised errors (see their rows)", highlight=False)
    if ours:
        stderr.print(f"[bold red]error:[/] {', '.join(ours)} raised errors (see their rows)", highlight=False)
        return FAILED_EXIT_CODE
    return 0


def run_bench_job(request: BenchRequest) -> int:
    """Plan, run, print, write; the command's exit code."""
    plan = plan_bench(request)
    console = report_console()
    environment = describe(plan.device)
    try:  # the bar is gone before the error prints
        with progress_bar(Console(stderr=True)) as progress:
            if isinstance(plan, ModelBenchPlan):
                rows = run_model_bench(plan, environment, StepProgress(progress, None))
                title = f"sla2 bench: model {plan.model}"
            else:
                rows = run_kernel_bench(plan, environment, StepProgress(progress, plan.size))
                title = "sla2 bench: kernels"
    except KernelMismatch as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return FAILED_EXIT_CODE
    print_report(console, rows, environment, title)
    write_outputs(console, rows, request, on_cpu=plan.device.type != "cuda")
    return failure_exit_code(rows, Console(stderr=True, soft_wrap=True))
