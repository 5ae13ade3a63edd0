"""Quality suite on the embedded model: convert -> calibrate -> fine-tune -> validate, per method and sparsity.

Every job starts from the shipped embedded model, converts it at its sparsity, runs the stage-1
calibration its method has (sla2, oracle_router, exact_rest, oracle_exact: router + alpha; heuristic: alpha
with the identity router; dense, sparse_only, sla_proj: none), turns the layers into the method's variant
(`sla2cli.training.variants`), fine-tunes with THE SAME budget for every method (steps, batch, learning-rate
schedule, seed, procedural clips: the recipe's `finetune` defaults unless overridden; each variant trains
its own SLA2 parameters and every base weight), then measures the held-out validation loss with
`sla2cli.evaluate` at the training clip (8x64x64) and at twice its frames (16x64x64). The dense reference
is the shipped model fine-tuned the same way with dense attention (variant `dense`); it always runs, and
every row's ratio_vs_dense is its val_loss over the reference's.

Jobs run as separate worker processes, --jobs at a time on one device (the embedded model leaves a GPU
mostly idle). Each worker writes its row to its own json; the parent merges them into the CSV, so a
crashed job is a `failed` row, not a lost suite. --time-budget-minutes stops every fine-tuning early
enough to finish its evaluations by the deadline (the row says `stopped at step N`); a worker still
running past the deadline plus a grace period is terminated and reported as failed.

--ship DIR writes the sla2 model at the recipe's sparsity (0.97) in the form the package ships it
(`sla2cli.embedded.shipped_sla2`: bf16 base weights) and evaluates that rounded form as loaded.

  python benchmarks/quality_suite.py --matrix acceptance --jobs 9 --device cuda --ship shipped/
  python benchmarks/quality_suite.py --methods sla2,heuristic --sparsities 0.97 --clip 2,16,16 --steps 2 \\
      --device cpu --validation-samples 1 --router-steps 5 --alpha-steps 5      # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import sla2cli
from sla2cli.bench.environment import git_commit, triton_version
from sla2cli.embedded.loading import load_embedded_model
from sla2cli.embedded.shipped_sla2 import add_shipped_measurements, load_shipped_sla2, write_shipped_sla2
from sla2cli.errors import UserError
from sla2cli.files import atomic_path
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import EMBEDDED_RECIPE, get_recipe
from sla2cli.ops.geometry import DEFAULT_SPARSITIES
from sla2cli.report.inputs import embedded_samples, family_inputs, forward_inputs
from sla2cli.training.calibration import (
    CalibrationSettings,
    calibrate_layers,
    check_calibration_settings,
    collect_calls,
    summary_measurements,
)
from sla2cli.training.finetune import FinetuneSummary
from sla2cli.training.interrupt import Deadline
from sla2cli.training.settings import Clip, parse_clip, recipe_defaults
from sla2cli.training.variants import (
    DENSE,
    EXACT_REST,
    HEURISTIC,
    METHODS,
    ORACLE_EXACT,
    ORACLE_ROUTER,
    SLA2,
    SLA_PROJ,
    SPARSE_ONLY,
    apply_variant,
    check_method,
    variant_train_choice,
)

COLUMNS = ["method", "sparsity", "calibrate_steps", "finetune_steps", "val_loss", "dense_val_loss", "ratio_vs_dense",
           "minutes", "device", "commit"]
EXTRA_COLUMNS = ["status", "val_loss_converted", "val_loss_converted_16f", "val_loss_before", "val_loss_16f",
                 "dense_val_loss_16f", "ratio_vs_dense_16f", "shipped_val_loss", "shipped_val_loss_16f",
                 "calibration_rel_l2_before", "calibration_rel_l2_after", "steps_planned", "batch_size",
                 "learning_rate", "clip", "clip_16f", "samples_per_second", "train_minutes", "wall_minutes",
                 "peak_memory_gb", "torch", "triton", "error"]
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "quality_embedded.csv"
MATRICES = ("full", "acceptance")
TRAINED_METHODS = tuple(method for method in METHODS if method != DENSE)
DENSE_SPARSITY = 0.0  # the dense reference's row: full attention
# Stage 1 per method: what `sla2 calibrate` trains before the variant is applied (None: no stage 1).
# oracle_router, exact_rest and oracle_exact get sla2's calibration, so that only the selection or the rest differs
# from sla2.
ROUTER_AND_ALPHA, ALPHA_ONLY = "router+alpha", "alpha"
CALIBRATION = {DENSE: None, SPARSE_ONLY: None, SLA_PROJ: None, HEURISTIC: ALPHA_ONLY, SLA2: ROUTER_AND_ALPHA,
               ORACLE_ROUTER: ROUTER_AND_ALPHA, EXACT_REST: ROUTER_AND_ALPHA, ORACLE_EXACT: ROUTER_AND_ALPHA}
OK, FAILED = "ok", "failed"
# A job's fine-tuning stops early enough for what follows it: the final validation at the training clip and
# the evaluation at twice the frames (together about 1.5 of the latter, timed before training, when the kernels
# are compiled), as much again for the shipped form, and a margin for writing.
EVALUATIONS_AFTER_TRAINING, DEADLINE_MARGIN_S = 1.5, 20.0
FIT_MINUTES = 8.0  # the summary says how many steps would fit in this many minutes at the measured rates
KILL_GRACE_S = 45.0  # a worker still running this long after the deadline is terminated
POLL_S = 0.5


@dataclass(frozen=True)
class SuiteSettings:
    """What every job shares: the budget, the clips, the device, where scratch files and results go."""

    steps: int
    learning_rate: float
    batch_size: int
    clip: Clip
    device: str
    out: Path
    seed: int = 0
    validation_samples: int | None = None
    router_steps: int | None = None
    alpha_steps: int | None = None
    calibration_clips: int | None = None
    deadline: float | None = None  # wall-clock (time.time()) by which every job must be done
    ship: Path | None = None
    ship_sparsity: float | None = None
    threads: int | None = None

    @property
    def clip_16f(self) -> Clip:
        """The resolution check: twice the frames of the training clip."""
        frames, height, width = self.clip
        return 2 * frames, height, width


@dataclass(frozen=True)
class Job:
    method: str
    sparsity: float

    @property
    def name(self) -> str:
        return self.method if self.method == DENSE else f"{self.method}-{self.sparsity:g}"


@dataclass
class SuiteResult:
    rows: list[dict[str, Any]]
    csv: Path
    seconds: float
    shipped: dict[str, Any] | None = field(default=None)


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version(), "commit": git_commit()}


def parse_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"{option} needs at least one value")
    return items


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(item) for item in parse_list(text, "--sparsities")]
    except ValueError:
        raise UserError(f"--sparsities must be comma-separated numbers in (0, 1), e.g. 0.9,0.97; got {text!r}") \
            from None
    if any(not 0.0 < value < 1.0 for value in values):
        raise UserError(f"--sparsities must lie in (0, 1); got {text!r}")
    return sorted(set(values))


def build_jobs(methods: Sequence[str], sparsities: Sequence[float], matrix: str) -> list[Job]:
    """The dense reference, then every method at every sparsity (full), or sla2 at every sparsity and the
    other methods at the highest only (acceptance: the ablation at the hardest budget)."""
    if matrix not in MATRICES:
        raise UserError(f"--matrix must be one of {', '.join(MATRICES)}; got {matrix!r}")
    chosen = [check_method(method) for method in methods if method != DENSE]
    jobs = [Job(DENSE, DENSE_SPARSITY)]
    for method in chosen:
        levels = sparsities if matrix == "full" or method == SLA2 else [max(sparsities)]
        jobs += [Job(method, sparsity) for sparsity in levels]
    return list(dict.fromkeys(jobs))


# ---------------------------------------------------------------------------------------------- one job


def calibrate_in_memory(model: torch.nn.Module, settings: CalibrationSettings, clip: Clip, device: torch.device,
                        seed: int, clips: int | None = None) -> dict[str, float | int]:
    """Stage 1 as `sla2 calibrate` runs it on the embedded model (its calibration clips and timesteps, never
    the validation clips), on a model held in memory; returns the model card's calibration figures."""
    recipe = get_recipe(EMBEDDED_RECIPE)
    layers = sla2_layers(model)
    adapter = family_inputs(model, recipe)
    samples = embedded_samples(adapter, clip, clips or recipe.calibration.clips, calibration=True)
    forwards = forward_inputs(adapter, samples, recipe.calibration.timesteps, seed=seed, device=device,
                              dtype=next(model.parameters()).dtype)
    model.requires_grad_(False)
    calls = collect_calls([model], layers, forwards)
    results = calibrate_layers(layers, calls, settings)
    del calls
    return summary_measurements(results, settings)


def _timed(function: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def _significant(value: Any) -> Any:
    """Floats to 5 significant digits for the model card; anything else as it is."""
    return float(f"{value:.5g}") if isinstance(value, float) and math.isfinite(value) else value


def _shipped_measurements(summary: FinetuneSummary, calibration: dict[str, Any], settings: SuiteSettings,
                          env: dict[str, Any]) -> dict[str, Any]:
    """How the shipped weights were made, in the keys sla2 finetune and sla2 calibrate give a model card."""
    return {key: _significant(value) for key, value in {
        **calibration,
        "finetune_steps": summary.steps, "finetune_objective": summary.settings.objective,
        "finetune_data": summary.data, "finetune_learning_rate": summary.settings.learning_rate,
        "finetune_batch_size": summary.settings.batch_size, "finetune_seed": summary.settings.seed,
        "finetune_validation_loss_before": summary.validation_before,
        "finetune_validation_loss_after": summary.validation_after,
        "quality_suite_device": env["device"], "quality_suite_commit": env["commit"] or "unknown",
        "quality_suite_validation": f"{summary.settings.validation_samples} held-out clips, sla2cli.evaluate",
    }.items()}


def run_job(job: Job, settings: SuiteSettings) -> dict[str, Any]:
    """Convert, calibrate, apply the variant, fine-tune and evaluate one (method, sparsity); the CSV row.
    Each phase prints a line with the seconds since the start (the worker's log)."""
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {job.name}: {message}", flush=True)

    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    env = environment(device)
    recipe = get_recipe(EMBEDDED_RECIPE)
    validation = {"validation_samples": settings.validation_samples}
    row: dict[str, Any] = {"method": job.method, "sparsity": job.sparsity, "steps_planned": settings.steps,
                           "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
                           "clip": "x".join(map(str, settings.clip)), "clip_16f": "x".join(map(str, settings.clip_16f)),
                           **env}
    model = load_embedded_model(device=device)
    sla2cli.convert(model, sparsity=job.sparsity if job.method != DENSE else recipe.sparsity)
    if job.method == DENSE:
        apply_variant(model, DENSE)
    row["val_loss_converted"] = sla2cli.evaluate(model, clip=settings.clip, **validation)
    row["val_loss_converted_16f"], eval_seconds = _timed(
        lambda: sla2cli.evaluate(model, clip=settings.clip_16f, **validation))
    say(f"converted: val loss {row['val_loss_converted']:.4f}, at twice the frames {row['val_loss_converted_16f']:.4f}"
        f" ({eval_seconds:.1f} s)")
    calibration: dict[str, Any] = {}
    kind = CALIBRATION[job.method]
    row["calibrate_steps"] = 0
    if kind is not None:
        calibration_settings = CalibrationSettings.from_recipe(
            recipe, router_steps=settings.router_steps, alpha_steps=settings.alpha_steps,
            train_router=kind == ROUTER_AND_ALPHA)
        check_calibration_settings(calibration_settings)
        calibration = calibrate_in_memory(model, calibration_settings, settings.clip, device, settings.seed,
                                          settings.calibration_clips)
        row["calibrate_steps"] = calibration_settings.steps_per_layer()
        row["calibration_rel_l2_before"] = calibration["calibration_rel_l2_before"]
        row["calibration_rel_l2_after"] = calibration["calibration_rel_l2_after"]
        say(f"calibrated ({kind}): layer rel L2 {row['calibration_rel_l2_before']:.4f} -> "
            f"{row['calibration_rel_l2_after']:.4f}")
    if job.method != DENSE:
        apply_variant(model, job.method)
    ships = settings.ship is not None and job.method == SLA2 and job.sparsity == settings.ship_sparsity
    stop = None
    if settings.deadline is not None:
        reserve = eval_seconds * EVALUATIONS_AFTER_TRAINING * (2 if ships else 1)
        stop = Deadline(time.monotonic() + (settings.deadline - time.time()) - reserve - DEADLINE_MARGIN_S)
    summary = sla2cli.finetune(
        model, steps=settings.steps, lr=settings.learning_rate, batch_size=settings.batch_size,
        train=variant_train_choice(model), device=device, stop=stop, clip=settings.clip, seed=settings.seed,
        validate_every=0, **validation,
    )
    row.update(finetune_steps=summary.steps, val_loss_before=summary.validation_before,
               val_loss=summary.validation_after, samples_per_second=summary.samples_per_second,
               train_minutes=summary.seconds / 60)
    row["status"] = f"stopped at step {summary.steps} of {settings.steps} (time budget)" if summary.interrupted else OK
    say(f"fine-tuned {summary.steps} steps in {summary.seconds:.0f} s: val loss {summary.validation_before:.4f} -> "
        f"{summary.validation_after:.4f} ({row['status']})")
    row["val_loss_16f"] = sla2cli.evaluate(model, clip=settings.clip_16f, **validation)
    if ships:
        write_shipped_sla2(model, settings.ship, _shipped_measurements(summary, calibration, settings, env))
        del model
        shipped = load_shipped_sla2(device=device, assets_dir=settings.ship)
        row["shipped_val_loss"] = sla2cli.evaluate(shipped, clip=settings.clip, **validation)
        row["shipped_val_loss_16f"] = sla2cli.evaluate(shipped, clip=settings.clip_16f, **validation)
        say(f"shipped form: val loss {row['shipped_val_loss']:.4f}, at twice the frames "
            f"{row['shipped_val_loss_16f']:.4f}")
        add_shipped_measurements(settings.ship, {"shipped_val_loss": _significant(row["shipped_val_loss"]),
                                                 "shipped_val_loss_16f": _significant(row["shipped_val_loss_16f"])})
    row["peak_memory_gb"] = _peak_memory_gb(device)
    row["minutes"] = (time.monotonic() - started) / 60
    say(f"done: val loss at twice the frames {row['val_loss_16f']:.4f}")
    return row


# ------------------------------------------------------------------------------------------ the workers


def _paths(settings: SuiteSettings, job: Job) -> dict[str, Path]:
    return {kind: settings.out / kind / f"{job.name}.{suffix}"
            for kind, suffix in (("specs", "json"), ("results", "json"), ("logs", "log"))}


def _json_ready(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps({k: _json_ready(v) for k, v in document.items()}, indent=2) + "\n")


def worker_main(spec_path: Path) -> int:
    """Run the job a spec file names; write its row (or its error) to the result file; exit 0 if written."""
    spec = json.loads(spec_path.read_text())
    job = Job(spec["job"]["method"], spec["job"]["sparsity"])
    raw = spec["settings"]
    settings = SuiteSettings(**{**raw, "clip": tuple(raw["clip"]), "out": Path(raw["out"]),
                                "ship": Path(raw["ship"]) if raw["ship"] else None})
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        row = run_job(job, settings)
    except Exception as error:  # a failed job still reports, as a row
        traceback.print_exc()
        row = {"method": job.method, "sparsity": job.sparsity, "status": FAILED,
               "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"[:300]}
    write_json(Path(spec["result"]), row)
    print(json.dumps({k: _json_ready(v) for k, v in row.items()}), flush=True)
    return 0


WorkerCommand = Callable[[Job, Path], list[str]]


def default_worker_command(job: Job, spec: Path) -> list[str]:
    """This script in worker mode, run by the same interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)]


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def collect_row(job: Job, result: Path, log: Path, returncode: int | None, note: str = "") -> dict[str, Any]:
    """The worker's row, or a failed row saying why there is none (exit code, last log line)."""
    if result.is_file():
        try:
            return json.loads(result.read_text())
        except json.JSONDecodeError:
            pass
    why = note or f"worker exited with code {returncode}"
    last = _last_line(log)
    return {"method": job.method, "sparsity": job.sparsity, "status": FAILED,
            "error": f"{why}; {last}" if last else why}


@dataclass
class Running:
    job: Job
    process: subprocess.Popen
    log: Any
    started: float


class WorkerPool:
    """Runs every job in its own process, `parallel` at a time, and keeps a row per job (failed ones too).
    `on_rows` gets every job's row so far (unfinished ones as failed) whenever a job ends."""

    def __init__(self, jobs: list[Job], settings: SuiteSettings, parallel: int, console: Console,
                 worker_command: WorkerCommand = default_worker_command,
                 on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.jobs, self.settings, self.parallel, self.console = jobs, settings, parallel, console
        self.worker_command, self.on_rows = worker_command, on_rows
        self.pending = list(jobs)
        self.running: list[Running] = []
        self.rows: dict[Job, dict[str, Any]] = {}
        self.environment = {**os.environ, "OMP_NUM_THREADS": str(settings.threads or 1), "PYTHONUNBUFFERED": "1"}

    def run(self) -> list[dict[str, Any]]:
        """Every job's row; interrupted (Ctrl-C, SIGTERM), the workers are stopped and the rest is failed."""
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.parallel:
                    self._start(self.pending.pop(0))
                time.sleep(POLL_S)
                self._collect()
        except KeyboardInterrupt:
            self.console.print("interrupted: stopping the workers", highlight=False)
        finally:  # no worker outlives the suite
            for item in self.running:
                item.process.kill()
                item.process.wait()
                item.log.close()
        return [self.rows.get(job) or unfinished_row(job) for job in self.jobs]

    def _start(self, job: Job) -> None:
        paths = _paths(self.settings, job)
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        paths["results"].unlink(missing_ok=True)
        spec = {"job": asdict(job), "settings": {k: _json_ready(v) for k, v in asdict(self.settings).items()},
                "result": str(paths["results"])}
        write_json(paths["specs"], spec)
        log = open(paths["logs"], "w")  # noqa: SIM115 - closed when the worker ends
        process = subprocess.Popen(self.worker_command(job, paths["specs"]), stdout=log, stderr=subprocess.STDOUT,
                                   env=self.environment)
        self.running.append(Running(job, process, log, time.monotonic()))
        self.console.print(f"started {job.name} (pid {process.pid})", highlight=False)

    def _overdue(self) -> bool:
        return self.settings.deadline is not None and time.time() > self.settings.deadline + KILL_GRACE_S

    def _collect(self) -> None:
        """Rows of the workers that ended; past the deadline, terminate the rest and start no more."""
        overdue = self._overdue()
        for item in list(self.running):
            code, note = item.process.poll(), ""
            if code is None and overdue:
                item.process.send_signal(signal.SIGTERM)
                try:
                    code = item.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    item.process.kill()
                    code = item.process.wait()
                note = "terminated: still running past the time budget"
            if code is None:
                continue
            item.log.close()
            self.running.remove(item)
            paths = _paths(self.settings, item.job)
            row = collect_row(item.job, paths["results"], paths["logs"], code, note)
            row["wall_minutes"] = (time.monotonic() - item.started) / 60  # start-up and imports included
            self.rows[item.job] = row
            self.console.print(f"finished {item.job.name}: {row.get('status')} ({row['wall_minutes']:.1f} min)",
                               highlight=False)
            if self.on_rows is not None:
                self.on_rows([self.rows.get(job) or unfinished_row(job) for job in self.jobs])
        if overdue:
            for job in self.pending:
                self.rows[job] = {"method": job.method, "sparsity": job.sparsity, "status": FAILED,
                                  "error": "not started: the time budget ran out"}
            self.pending.clear()


def unfinished_row(job: Job) -> dict[str, Any]:
    return {"method": job.method, "sparsity": job.sparsity, "status": FAILED, "error": "not finished"}


# ----------------------------------------------------------------------------------- merging, output


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with the dense reference's figures beside its own and their ratios."""
    dense = next((row for row in rows if row["method"] == DENSE), {})
    merged = []
    for row in rows:
        row = dict(row)
        for suffix in ("", "_16f"):
            reference, own = dense.get(f"val_loss{suffix}"), row.get(f"val_loss{suffix}")
            row[f"dense_val_loss{suffix}"] = reference
            row[f"ratio_vs_dense{suffix}"] = own / reference if own is not None and reference else None
        merged.append(row)
    return merged


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = COLUMNS + EXTRA_COLUMNS
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in columns})


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def _figure(value: Any, pattern: str = "{:.4f}") -> str:
    return pattern.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def render(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title, header_style="bold")
    for header in ("method", "sparsity", "calib.", "steps", "val loss", "vs dense", "val 16f", "vs dense 16f",
                   "converted", "before", "min", "status"):
        table.add_column(header, justify="left" if header in ("method", "status") else "right")
    for row in rows:
        table.add_row(
            row["method"], _figure(row.get("sparsity"), "{:g}"), _figure(row.get("calibrate_steps"), "{:d}"),
            _figure(row.get("finetune_steps"), "{:d}"), _figure(row.get("val_loss")),
            _figure(row.get("ratio_vs_dense"), "{:.3f}x"), _figure(row.get("val_loss_16f")),
            _figure(row.get("ratio_vs_dense_16f"), "{:.3f}x"), _figure(row.get("val_loss_converted")),
            _figure(row.get("val_loss_before")), _figure(row.get("minutes"), "{:.1f}"),
            str(row.get("status")) if row.get("status") != FAILED else f"[red]failed: {row.get('error', '')}[/]",
        )
    console.print(table)


def failure_tails(rows: list[dict[str, Any]], settings: SuiteSettings, lines: int = 15) -> list[str]:
    """The end of each failed worker's log, for logs read far from the machine that ran them."""
    shown = []
    for row in rows:
        if row.get("status") != FAILED:
            continue
        log = _paths(settings, Job(row["method"], row["sparsity"]))["logs"]
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        shown += [f"--- end of {log.name}", *tail]
    return shown


def steps_that_fit(rows: list[dict[str, Any]], minutes: float) -> str | None:
    """From the finished jobs' rates under this concurrency: the steps every job would finish in `minutes`
    (the slowest job's overhead outside the loop and its step rate decide)."""
    finished = [row for row in rows if row.get("status") != FAILED and row.get("train_minutes")]
    if not finished:
        return None
    fits = []
    for row in finished:
        rate = row["finetune_steps"] / (row["train_minutes"] * 60)
        overhead = (row.get("wall_minutes", row["minutes"]) - row["train_minutes"]) * 60
        fits.append((max(0.0, minutes * 60 - overhead) * rate, rate, overhead, row))
    steps, rate, overhead, row = min(fits, key=lambda item: item[0])
    return (f"fit: {int(steps)} steps would finish in {minutes:g} min per job at this concurrency (slowest: "
            f"{row['method']}@{row['sparsity']:g}, {rate:.2f} steps/s, {overhead:.0f} s outside the loop)")


def plain_summary(rows: list[dict[str, Any]], result_csv: Path, seconds: float) -> list[str]:
    """Short lines for the end of a log: one per row, the failures, the CSV."""
    lines = []
    for row in rows:
        if row.get("status") == FAILED:
            lines.append(f"{row['method']}@{row['sparsity']:g}: FAILED {row.get('error', '')}")
            continue
        lines.append(
            f"{row['method']}@{row['sparsity']:g}: val {_figure(row.get('val_loss'))} "
            f"({_figure(row.get('ratio_vs_dense'), '{:.3f}x')} dense), 16f {_figure(row.get('val_loss_16f'))} "
            f"({_figure(row.get('ratio_vs_dense_16f'), '{:.3f}x')}), steps {row.get('finetune_steps')}, "
            f"{_figure(row.get('samples_per_second'), '{:.0f}')} samples/s, {_figure(row.get('minutes'), '{:.1f}')} "
            f"min, {row.get('status')}"
        )
    failed = sum(row.get("status") == FAILED for row in rows)
    lines.append(f"{len(rows)} jobs, {failed} failed, {seconds / 60:.1f} min in all; wrote {result_csv}")
    return lines


def finish_shipped(settings: SuiteSettings, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Add the figures only the whole suite knows to the shipped record: the dense references."""
    if settings.ship is None:
        return None
    shipped = next((row for row in rows if row["method"] == SLA2 and row["sparsity"] == settings.ship_sparsity
                    and row.get("shipped_val_loss") is not None), None)
    if shipped is None:
        return None
    dense = next((row for row in rows if row["method"] == DENSE), {})
    figures = {
        "dense_shipped_val_loss": dense.get("val_loss_converted"),
        "untrained_conversion_val_loss": shipped.get("val_loss_converted"),
        "dense_reference_val_loss": dense.get("val_loss"),
        "dense_reference_val_loss_16f": dense.get("val_loss_16f"),
        "dense_reference": "the shipped dense model fine-tuned with the same recipe and dense attention "
                           "(its figures only; its weights are not shipped)",
    }
    if dense.get("val_loss"):
        figures["shipped_ratio_vs_dense_reference"] = shipped["shipped_val_loss"] / dense["val_loss"]
    if dense.get("val_loss_16f") and shipped.get("shipped_val_loss_16f") is not None:
        figures["shipped_ratio_vs_dense_reference_16f"] = shipped["shipped_val_loss_16f"] / dense["val_loss_16f"]
    return add_shipped_measurements(settings.ship, {k: _significant(v) for k, v in figures.items() if v is not None})


def run_suite(jobs: list[Job], settings: SuiteSettings, *, parallel: int, result_csv: Path, console: Console,
              worker_command: WorkerCommand = default_worker_command) -> SuiteResult:
    """Run the jobs, merge their rows, write the CSV (atomically, again after every job, so a suite cut
    short keeps what it measured), finish the shipped record."""
    started = time.monotonic()
    pool = WorkerPool(jobs, settings, parallel, console, worker_command,
                      on_rows=lambda so_far: write_csv(result_csv, merge_rows(so_far)))
    rows = merge_rows(pool.run())
    write_csv(result_csv, rows)
    shipped = finish_shipped(settings, rows)
    return SuiteResult(rows=rows, csv=result_csv, seconds=time.monotonic() - started, shipped=shipped)


def settings_from_args(args: argparse.Namespace, jobs: list[Job]) -> SuiteSettings:
    recipe = get_recipe(EMBEDDED_RECIPE)
    defaults = recipe_defaults(recipe)
    clip = parse_clip(args.clip) if args.clip else None
    if clip is None:
        clip = defaults.clip or (recipe.resolution().frames, recipe.resolution().height, recipe.resolution().width)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    budget = args.time_budget_minutes
    if budget is not None and budget <= 0:
        raise UserError(f"--time-budget-minutes must be positive, got {budget}")
    ship_sparsity = recipe.sparsity
    if args.ship is not None and Job(SLA2, ship_sparsity) not in jobs:
        raise UserError(f"--ship needs sla2 at {ship_sparsity:g} in the matrix (add it to --sparsities)")
    steps = args.steps if args.steps is not None else defaults.steps
    learning_rate = args.lr if args.lr is not None else defaults.learning_rate
    batch_size = args.batch_size if args.batch_size is not None else defaults.batch_size
    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise UserError("--steps and --batch-size must be at least 1 and --lr positive")
    if args.calibration_clips is not None and args.calibration_clips < 1:
        raise UserError("--calibration-clips must be at least 1")
    return SuiteSettings(
        steps=steps, learning_rate=learning_rate, batch_size=batch_size, clip=clip, device=args.device,
        out=args.out.resolve(), seed=args.seed, validation_samples=args.validation_samples,
        router_steps=args.router_steps, alpha_steps=args.alpha_steps, calibration_clips=args.calibration_clips,
        deadline=time.time() + budget * 60 if budget is not None else None,
        ship=args.ship.resolve() if args.ship is not None else None, ship_sparsity=ship_sparsity,
        threads=args.threads or max(1, (os.cpu_count() or 1) // min(args.jobs, len(jobs))),
    )


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_argument("--matrix", default="full", choices=MATRICES,
                         help="full: every method at every sparsity; acceptance: sla2 at every sparsity, the other "
                              "methods at the highest (default: full)")
    options.add_argument("--methods", default=",".join(TRAINED_METHODS),
                         help=f"comma-separated, from {', '.join(METHODS)}; the dense reference always runs")
    options.add_argument("--sparsities", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES))
    options.add_argument("--steps", type=int, help="fine-tuning steps of every job (default: the recipe's)")
    options.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    options.add_argument("--batch-size", type=int, help="samples per step (default: the recipe's)")
    options.add_argument("--clip", help="FRAMES,HEIGHT,WIDTH of the training clips (default: the model's 8,64,64); "
                                        "the resolution check evaluates at twice the frames")
    options.add_argument("--validation-samples", type=int, help="held-out clips (default: the recipe's)")
    options.add_argument("--router-steps", type=int, help="stage-1 router steps per layer (default: the recipe's)")
    options.add_argument("--alpha-steps", type=int, help="stage-1 alpha steps per layer (default: the recipe's)")
    options.add_argument("--calibration-clips", type=int,
                         help="stage-1 calibration clips, each at the recipe's timesteps (default: the recipe's)")
    options.add_argument("--seed", type=int, default=0)
    options.add_argument("--jobs", type=int, default=1, help="worker processes at once on the device")
    options.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / jobs)")
    options.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options.add_argument("--out", type=Path, default=Path("quality-suite"),
                         help="scratch folder: job specs, results and logs")
    options.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="results (default: %(default)s)")
    options.add_argument("--time-budget-minutes", type=float,
                         help="every job stops fine-tuning early enough to finish by then and says so in its row")
    options.add_argument("--ship", type=Path, help="write the sla2 model at the recipe's sparsity here in the "
                                                   "shipped form (bf16 base weights) and evaluate that form")
    options.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return options


def _raise_interrupt(signal_number: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    console = Console() if sys.stdout.isatty() else Console(width=170)  # logs keep whole table rows
    try:
        jobs = build_jobs(parse_list(args.methods, "--methods"), parse_sparsities(args.sparsities), args.matrix)
        settings = settings_from_args(args, jobs)
        if args.csv.suffix.lower() != ".csv" or args.csv.is_dir():
            raise UserError(f"--csv {args.csv}: give a file name ending in .csv")
    except UserError as error:
        console.print(f"error: {error}", highlight=False)
        return 2
    console.print(f"{len(jobs)} jobs, {args.jobs} at a time on {settings.device}: "
                  f"{', '.join(job.name for job in jobs)}; {settings.steps} steps, batch {settings.batch_size}, "
                  f"lr {settings.learning_rate:g}, clip {settings.clip}", highlight=False)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # e.g. `timeout`: stop the workers, keep the CSV so far
    result = run_suite(jobs, settings, parallel=args.jobs, result_csv=args.csv, console=console)
    render(console, result.rows, f"quality suite: embedded model, {settings.steps} steps of batch "
                                 f"{settings.batch_size} per job ({result.seconds / 60:.1f} min)")
    if result.shipped is not None:
        console.print(f"shipped form written to {settings.ship}", highlight=False)
    for line in failure_tails(result.rows, settings):
        print(line, flush=True)
    fit = steps_that_fit(result.rows, FIT_MINUTES)
    for line in plain_summary(result.rows, result.csv, result.seconds) + ([fit] if fit else []):
        print(line, flush=True)
    return 1 if any(row.get("status") == FAILED for row in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
