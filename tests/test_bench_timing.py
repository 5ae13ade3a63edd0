"""`sla2cli.bench.timing`: how many repeats, and what is reported."""

from __future__ import annotations

import time

from bench_support import CPU

from sla2cli.bench.timing import CacheFlusher, TimingPlan, repeats_within_budget, time_call


def test_repeats_shrink_for_slow_calls_but_not_below_the_minimum():
    plan = TimingPlan(warmup=1, repeats=50, budget_s=1.0)
    assert repeats_within_budget(plan, 1.0) == 50
    assert repeats_within_budget(plan, 100.0) == 10
    assert repeats_within_budget(plan, 10_000.0) == 5
    assert repeats_within_budget(TimingPlan(repeats=2), 10_000.0) == 2


def test_cpu_timing_is_the_median_wall_time():
    calls = []

    def sleepy() -> None:
        calls.append(1)
        time.sleep(0.004)

    timing = time_call(sleepy, CPU, TimingPlan(warmup=2, repeats=5, budget_s=10.0), CacheFlusher(CPU))
    assert timing.repeats == 5 and len(calls) == 7
    assert 4.0 <= timing.median_ms < 50.0
    assert timing.min_ms <= timing.median_ms
