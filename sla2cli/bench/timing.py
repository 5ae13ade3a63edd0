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


@dataclass(frozen=True)
class TimingPlan:
    """warmup: untimed calls first (compilation, autotuning, allocator); repeats: most timed calls;
    budget_s: fewer repeats when a call is so slow that `repeats` of them would exceed this."""

    warmup: int = 3
    repeats: int = 20
    budget_s: float = 10.0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


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
    """At least MIN_REPEATS (or plan.repeats if smaller), at most plan.repeats, about budget_s in total."""
    affordable = math.floor(plan.budget_s * 1e3 / max(estimate_ms, 1e-6))
    return max(min(MIN_REPEATS, plan.repeats), min(plan.repeats, affordable))


def _wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _event_times_ms(fn: Callable[[], object], repeats: int, flush: CacheFlusher) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def time_call(
    fn: Callable[[], object], device: torch.device, plan: TimingPlan, flush: CacheFlusher
) -> Timing:
    """Median time of fn() in milliseconds after up to plan.warmup untimed calls.

    Warming up stops early once the warm-up calls have taken budget_s: compilation, autotuning and the
    allocator's growth happen in the first call, and a call that slow (a 14B model's forward at 720p
    takes about 17 s with dense attention) gains nothing from more untimed runs but minutes.
    """
    estimate_ms, spent_ms = math.inf, 0.0
    for _ in range(max(1, plan.warmup)):
        estimate_ms = _wall_ms(fn, device)
        spent_ms += estimate_ms
        if spent_ms >= plan.budget_s * 1e3:
            break
    repeats = repeats_within_budget(plan, estimate_ms)
    if device.type == "cuda":
        times = _event_times_ms(fn, repeats, flush)
    else:
        times = [_wall_ms(fn, device) for _ in range(repeats)]
    return Timing(median_ms=statistics.median(times), min_ms=min(times), repeats=repeats)


def peak_extra_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call allocates on top of what was already allocated (its outputs, workspace and
    autograd buffers), in MB; None on CPU, where PyTorch keeps no such statistic."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
