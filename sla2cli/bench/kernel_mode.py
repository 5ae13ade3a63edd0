"""Kernel mode: every provider at every shape, sparsity and mode, verified, then timed.

Dense providers do not depend on the sparsity, so they are measured once per shape and mode (their
rows have no sparsity). Speedups are against FA2 at the same shape and mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sla2cli.bench.cases import FORWARD, AttentionShape
from sla2cli.bench.checks import KernelMismatch
from sla2cli.bench.environment import Environment
from sla2cli.bench.flops import block_budget, shape_flops, sparse_share, tflops
from sla2cli.bench.inputs import AttentionInputs, forward_backward, make_inputs
from sla2cli.bench.providers import BASELINE, DENSE, ROUTING, Provider, ProviderUnavailable
from sla2cli.bench.records import FAILED, OK, OUT_OF_MEMORY, SKIPPED, Measurement
from sla2cli.bench.timing import CacheFlusher, TimingPlan, time_call
from sla2cli.ops.quantization import QUANT_NONE

ACCURACY_COLUMNS = ("rel_l2_vs_sla2", "checked_on")  # on every kernel row (empty where it means nothing): fixed columns


@dataclass(frozen=True)
class KernelBenchPlan:
    shapes: list[AttentionShape]
    sparsities: list[float]
    modes: list[str]
    providers: list[Provider]
    dtype: torch.dtype
    device: torch.device
    timing: TimingPlan
    seed: int = 0

    def sparsities_for(self, provider: Provider) -> list[float | None]:
        return [None] if provider.kind == DENSE else list(self.sparsities)

    @property
    def size(self) -> int:
        """Number of rows the plan produces."""
        per_case = sum(len(self.sparsities_for(p)) for p in self.providers)
        return len(self.shapes) * len(self.modes) * per_case


def _free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fill_rates(row: Measurement, provider: Provider, shape: AttentionShape) -> None:
    """TFLOP/s columns: dense-equivalent (full attention FLOPs) and actual (sparse branch share)."""
    if provider.kind == ROUTING or row.median_ms is None:
        return
    dense_flops = shape_flops(shape, row.mode)
    row.dense_tflops = tflops(dense_flops, row.median_ms)
    row.sparse_tflops = tflops(dense_flops * sparse_share(shape, row.sparsity), row.median_ms)


def measure(
    provider: Provider,
    inputs: AttentionInputs,
    sparsity: float | None,
    mode: str,
    plan: KernelBenchPlan,
    flusher: CacheFlusher,
    environment: Environment,
) -> Measurement:
    """One row: skipped with a reason, or verified and timed. A wrong kernel raises KernelMismatch;
    any other exception becomes a row with status "error"."""
    shape = inputs.shape
    row = Measurement(
        provider=provider.name,
        shape=shape.label,
        sparsity=sparsity,
        mode=mode,
        dtype=str(plan.dtype).removeprefix("torch."),
        **block_budget(shape, sparsity)._asdict(),
        extra=dict.fromkeys(ACCURACY_COLUMNS),
        environment=environment.as_dict(),
    )
    reason = provider.not_installed() or provider.unsupported(plan.device, plan.dtype, mode)
    if reason is not None:
        row.status, row.note = SKIPPED, reason
        return row
    try:
        row.quant = provider.quant_mode(plan.device)
        call = provider.build(inputs, sparsity)
        provider.verify(inputs, sparsity, call)
        row.extra["checked_on"] = provider.checked_on(inputs)
        row.extra.update(provider.accuracy(inputs, sparsity, call))
        step: Callable[[], object] = call if mode == FORWARD else forward_backward(call, inputs)
        timing = time_call(step, plan.device, plan.timing, flusher, before_each=inputs.clear_grads)
        inputs.clear_grads()
        row.peak_mem_mb = timing.peak_extra_mb
    except ProviderUnavailable as error:
        row.status, row.note = SKIPPED, str(error)
        return row
    except torch.OutOfMemoryError:
        row.status, row.note = OUT_OF_MEMORY, "out of GPU memory at this shape"
        return row
    except KernelMismatch:
        raise
    except Exception as error:  # a crash is reported on its row; the other providers still run
        row.status, row.note = FAILED, one_line(error)
        return row
    finally:
        inputs.clear_grads()
        _free_cached_memory(plan.device)
    row.median_ms, row.min_ms, row.repeats = timing.median_ms, timing.min_ms, timing.repeats
    notes = [provider.summary, *([] if row.quant in (None, QUANT_NONE) else [f"ran {row.quant}"])]
    row.note = "; ".join([*notes, *filter(None, [provider.decision_note(inputs)])])
    _fill_rates(row, provider, shape)
    return row


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def fill_speedups(rows: list[Measurement]) -> None:
    """speedup_vs_fa2 = FA2's median / the row's median, at the same shape and mode."""
    baseline = {
        (r.shape, r.mode): r.median_ms
        for r in rows
        if r.provider == BASELINE and r.status == OK and r.median_ms
    }
    for row in rows:
        reference = baseline.get((row.shape, row.mode))
        if reference is not None and row.median_ms:
            row.speedup_vs_fa2 = reference / row.median_ms


def run_kernel_bench(
    plan: KernelBenchPlan,
    environment: Environment,
    on_step: Callable[[str], None] = lambda description: None,
) -> list[Measurement]:
    """All rows of the plan; on_step(description) is called before each one (progress display)."""
    flusher = CacheFlusher(plan.device)
    rows: list[Measurement] = []
    for shape in plan.shapes:
        for mode in plan.modes:
            inputs = make_inputs(shape, mode, plan.dtype, plan.device, plan.seed)
            for provider in plan.providers:
                for sparsity in plan.sparsities_for(provider):
                    level = "" if sparsity is None else f" @ {sparsity:g}"
                    on_step(f"{provider.name} {shape.label} {mode}{level}")
                    rows.append(measure(provider, inputs, sparsity, mode, plan, flusher, environment))
            del inputs
            _free_cached_memory(plan.device)
    fill_speedups(rows)
    return rows
