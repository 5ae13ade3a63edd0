"""`sla2cli.bench.kernel_mode`: measuring one case, running every case, speed-ups against FA2."""

from __future__ import annotations

import pytest
from bench_support import CPU, Crashes, measure_provider, quick_plan, rounded

from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape
from sla2cli.bench.environment import describe
from sla2cli.bench.kernel_mode import fill_speedups, run_kernel_bench
from sla2cli.bench.output import rows_frame
from sla2cli.bench.providers import get_provider
from sla2cli.bench.records import FAILED, OK, Measurement

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_crashing_provider_gets_an_error_row():
    row = measure_provider(Crashes())
    assert row.status == FAILED and row.median_ms is None
    assert row.note == "RuntimeError: kernel launch failed on this device"


def test_speedups_are_relative_to_fa2_at_the_same_shape_and_mode():
    rows = [
        Measurement("fa2", "s", None, FORWARD, median_ms=10.0),
        Measurement("sla2", "s", 0.9, FORWARD, median_ms=2.0),
        Measurement("sla2", "s", 0.9, FORWARD_BACKWARD, median_ms=2.0),
        Measurement("sla2", "t", 0.9, FORWARD, median_ms=2.0),
    ]
    fill_speedups(rows)
    assert [r.speedup_vs_fa2 for r in rows] == [1.0, 5.0, None, None]


def test_kernel_bench_rows_cover_every_case():
    providers = [get_provider("sdpa"), get_provider("sla2")]
    plan = quick_plan(providers, modes=(FORWARD, FORWARD_BACKWARD), sparsities=(0.9, 0.95))
    seen = []
    rows = run_kernel_bench(plan, describe(CPU), seen.append)
    assert plan.size == len(rows) == len(seen) == 2 * (1 + 2)
    assert [(r.provider, r.sparsity, r.mode) for r in rows[:3]] == [
        ("sdpa", None, FORWARD), ("sla2", 0.9, FORWARD), ("sla2", 0.95, FORWARD)
    ]
    assert all(r.status == OK and r.environment["device"] == "cpu" for r in rows)


def test_rows_carry_k_sel_and_the_effective_sparsity():
    """At 1024 tokens (16 key blocks) 0.9 and 0.97 both keep one key block: the rows say so."""
    shape = AttentionShape(1, 2, 1024, 64)
    plan = quick_plan([get_provider("sdpa"), get_provider("sla2")], shape=shape, sparsities=(0.9, 0.97, 0.5))
    rows = run_kernel_bench(plan, describe(CPU), lambda step: None)
    dense = rows[0]
    assert (dense.sparsity, dense.k_sel, dense.key_blocks, dense.effective_sparsity) == (None, None, None, None)
    for row in rows[1:]:
        k_sel, effective = rounded(row.sparsity, 16)
        assert (row.k_sel, row.key_blocks) == (k_sel, 16)
        assert row.effective_sparsity == pytest.approx(effective)
    assert rows[1].effective_sparsity == rows[2].effective_sparsity != pytest.approx(0.9)
    assert rows[3].effective_sparsity == pytest.approx(0.5)
    frame = rows_frame(rows)
    assert list(frame["k_sel"])[1:] == [r.k_sel for r in rows[1:]]
    assert frame["effective_sparsity"].tolist()[1:] == [r.effective_sparsity for r in rows[1:]]
