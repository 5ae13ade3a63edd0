"""How a call is timed: warm-up, then the median of many repeats with cold caches.

On a GPU each repeat is bracketed by CUDA events and preceded by a 256 MB write, so that no provider
gains from finding its inputs in the 50 MB L2 of the previous repeat. On a CPU, wall-clock
(time.perf_counter) stands in; those numbers only compare providers on that CPU.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

FLUSH_BYTES = 256 * 1024 * 1024
MIN_REPEATS = 5
# A call longer than the whole budget (a 14B model's dense forward at 720p: about 17 s) gets this many: its
# run-to-run spread is far below its length, and two more such calls cost half a minute.
MIN_REPEATS_SLOW = 3


@dataclass(frozen=True)
class TimingPlan:
    """warmup: untimed calls first (compilation, autotuning, allocator); repeats: most timed calls;
    budget_s: fewer repeats when a call is so slow that `repeats` of them would exceed this."""

    warmup: int = 3
    repeats: int = 20
    budget_s: float = 10.0


@dataclass(frozen=True)
class Timing:
    """peak_extra_mb: memory a timed call allocates on top of what was allocated before it (its outputs,
    workspace and autograd buffers), the most over the timed calls; None on CPU, which keeps no such count."""

    median_ms: float
    min_ms: float
    repeats: int
    peak_extra_mb: float | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Overwrites a 256 MB buffer: evicts L2 (and most of what a previous call left in caches)."""

    def __init__(self, device: torch.device) -> None:
        on_gpu = device.type == "cuda"
        self.buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if on_gpu else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.fill_(1)


def repeats_within_budget(plan: TimingPlan, estimate_ms: float) -> int:
    """About budget_s in total, at most plan.repeats, and at least MIN_REPEATS (MIN_REPEATS_SLOW for a call
    longer than the whole budget; plan.repeats if that is smaller)."""
    affordable = math.floor(plan.budget_s * 1e3 / max(estimate_ms, 1e-6))
    floor = MIN_REPEATS_SLOW if estimate_ms >= plan.budget_s * 1e3 else MIN_REPEATS
    return max(min(floor, plan.repeats), min(plan.repeats, affordable))


def _wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _event_times_ms(
    fn: Callable[[], object], repeats: int, flush: CacheFlusher, before_each: Callable[[], object]
) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        before_each()
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _nothing() -> None:
    return None


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    plan: TimingPlan,
    flush: CacheFlusher,
    before_each: Callable[[], object] = _nothing,
) -> Timing:
    """Median time of fn() in milliseconds after up to plan.warmup untimed calls, and its peak extra memory.

    Warming up stops early once the warm-up calls have taken budget_s: compilation, autotuning and the
    allocator's growth happen in the first call, and a call that slow gains nothing from more untimed runs
    but minutes. The memory peak is read over the timed calls, after the warm-up has allocated what stays
    (workspaces, caches), so that it needs no call of its own. before_each runs untimed before every call:
    a training step passes what drops its gradients, so that each call allocates them as a training step
    does and the peak counts them.
    """
    estimate_ms, spent_ms = math.inf, 0.0
    for _ in range(max(1, plan.warmup)):
        before_each()
        estimate_ms = _wall_ms(fn, device)
        spent_ms += estimate_ms
        if spent_ms >= plan.budget_s * 1e3:
            break
    repeats = repeats_within_budget(plan, estimate_ms)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            before_each()
            times.append(_wall_ms(fn, device))
        return Timing(median_ms=statistics.median(times), min_ms=min(times), repeats=repeats)
    before_each()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    times = _event_times_ms(fn, repeats, flush, before_each)
    peak_extra_mb = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return Timing(statistics.median(times), min(times), repeats, peak_extra_mb)
