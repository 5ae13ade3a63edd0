"""`sla2cli.bench.model_mode`: dense against SLA2 in a whole model."""

from __future__ import annotations

import pytest
import torch
from bench_support import CPU, QUICK

from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD
from sla2cli.bench.environment import describe
from sla2cli.bench.model_mode import ModelBenchPlan, run_model_bench
from sla2cli.bench.model_setup import prepare_model
from sla2cli.bench.records import OK
from sla2cli.bench.timing import TimingPlan
from sla2cli.integration.conversion import sla2_processors

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_plan(model: str, *, scaled_down: bool, train_step: bool, resolution: str, frames: int):
    return ModelBenchPlan(
        model=model, resolution=resolution, frames=frames, random_weights=True, scaled_down=scaled_down,
        train_step=train_step, sparsity=None, dtype=torch.float32, device=CPU,
        timing=TimingPlan(warmup=1, repeats=1),
    )


def test_model_mode_times_dense_and_sla2_with_the_same_weights():
    plan = _model_plan("embedded", scaled_down=False, train_step=True, resolution="16x16", frames=2)
    rows = run_model_bench(plan, describe(CPU))
    assert [(r.provider, r.mode) for r in rows] == [
        ("sdpa", FORWARD), ("sla2", FORWARD), ("sdpa", FORWARD_BACKWARD), ("sla2", FORWARD_BACKWARD)
    ]
    assert all(r.status == OK and r.median_ms > 0 for r in rows)
    # 2 latent frames of 16 x 16 with 1 x 2 x 2 patches: 128 tokens; the embedded model has 4 heads of 64.
    assert {r.shape for r in rows} == {"1x4x128x64"}
    sla2_rows = [r for r in rows if r.provider == "sla2"]
    assert all(r.sparsity == 0.97 and r.k_sel == 1 for r in sla2_rows)
    # Same weights, different attention: the outputs differ, but not wildly.
    assert 0.0 < sla2_rows[0].extra["rel_error_vs_dense"] < 1.0
    assert sla2_rows[0].extra["speedup_vs_dense"] == pytest.approx(rows[0].median_ms / rows[1].median_ms)
    assert rows[0].extra["clip"] == "16x16x2"


def test_model_mode_builds_a_recipe_model_scaled_down():
    plan = _model_plan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", scaled_down=True, train_step=False,
                       resolution="128x128", frames=5)
    rows = run_model_bench(plan, describe(CPU))
    assert [r.provider for r in rows] == ["sdpa", "sla2"]
    assert {r.shape for r in rows} == {"1x2x128x64"}  # scaled-down Wan: 2 heads of 64
    assert "Wan2.1 T2V 1.3B" in rows[1].note and "scaled down" in rows[1].note
    bench = prepare_model(plan.request())
    assert len(sla2_processors(bench.model)) == 2  # both layers converted


@pytest.mark.gpu
def test_gpu_model_mode_pins_fa2_for_the_dense_run():
    device = torch.device("cuda")
    plan = ModelBenchPlan(
        model="wan2.1-t2v-1.3b", resolution="256x256", frames=9, random_weights=True, scaled_down=True,
        train_step=True, sparsity=0.9, dtype=torch.bfloat16, device=device, timing=QUICK,
    )
    rows = run_model_bench(plan, describe(device))
    assert [r.provider for r in rows] == ["fa2", "sla2", "fa2", "sla2"]
    assert all(r.status == OK and r.peak_mem_mb is not None for r in rows)
    assert rows[1].speedup_vs_fa2 is not None and rows[1].shape == "1x2x768x64"
