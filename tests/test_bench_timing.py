"""`sla2cli.bench.timing`: how many repeats, and what is reported."""

from __future__ import annotations

import pytest
from bench_support import CPU

from sla2cli.bench import timing
from sla2cli.bench.timing import CacheFlusher, TimingPlan, repeats_within_budget, time_call


def test_repeats_shrink_for_slow_calls_but_not_below_the_minimum():
    plan = TimingPlan(warmup=1, repeats=50, budget_s=1.0)
    assert repeats_within_budget(plan, 1.0) == 50
    assert repeats_within_budget(plan, 100.0) == 10
    assert repeats_within_budget(plan, 500.0) == timing.MIN_REPEATS
    # a call longer than the whole budget: the smaller floor
    assert repeats_within_budget(plan, 1_000.0) == timing.MIN_REPEATS_SLOW
    assert repeats_within_budget(plan, 10_000.0) == timing.MIN_REPEATS_SLOW
    assert repeats_within_budget(TimingPlan(repeats=2), 10_000.0) == 2


def test_cpu_timing_is_the_median_of_the_timed_calls(monkeypatch):
    """A scripted clock: each call takes a known time, so the median, the minimum and which calls are
    warm-ups are exact."""
    durations_ms = iter([40.0, 30.0, 5.0, 1.0, 3.0, 2.0, 4.0])  # two warm-ups, then five timed calls
    clock = [0.0]
    calls = []

    def call() -> None:
        calls.append(1)
        clock[0] += next(durations_ms) / 1e3

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    measured = time_call(call, CPU, TimingPlan(warmup=2, repeats=5, budget_s=10.0), CacheFlusher(CPU))
    assert measured.repeats == 5 and len(calls) == 7
    assert measured.median_ms == pytest.approx(3.0) and measured.min_ms == pytest.approx(1.0)


def test_warm_up_stops_once_it_has_taken_the_budget(monkeypatch):
    """A call slower than the whole budget is warmed up once, not plan.warmup times (minutes at 14B)."""
    clock = [0.0]
    calls = []

    def call() -> None:
        calls.append(1)
        clock[0] += 2.0  # 2 s per call, budget 1.5 s

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    measured = time_call(call, CPU, TimingPlan(warmup=3, repeats=20, budget_s=1.5), CacheFlusher(CPU))
    assert measured.repeats == timing.MIN_REPEATS_SLOW and len(calls) == 1 + timing.MIN_REPEATS_SLOW
    assert measured.median_ms == pytest.approx(2000.0)


def test_before_each_runs_untimed_before_every_call(monkeypatch):
    """What drops a training step's gradients runs before the warm-up and every timed call, outside the
    timed span; on a CPU there is no memory peak to report."""
    clock = [0.0]
    events = []

    def call() -> None:
        events.append("call")
        clock[0] += 0.001

    def before_each() -> None:
        events.append("reset")
        clock[0] += 5.0  # would dominate every time if it were timed

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    measured = time_call(call, CPU, TimingPlan(warmup=2, repeats=5, budget_s=10.0), CacheFlusher(CPU), before_each)
    assert events == ["reset", "call"] * 7
    assert measured.median_ms == pytest.approx(1.0) and measured.peak_extra_mb is None
