"""`sla2cli.bench.job`: the plan a request gives (per-device defaults, which mode) and the exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from sla2cli.bench.cases import CPU_DEFAULT_SHAPES, MODES
from sla2cli.bench.job import (
    CPU_TIME_BUDGET_S,
    CPU_WARMUP,
    FAILED_EXIT_CODE,
    BenchRequest,
    failure_exit_code,
    plan_bench,
)
from sla2cli.bench.kernel_mode import KernelBenchPlan
from sla2cli.bench.model_mode import ModelBenchPlan
from sla2cli.bench.records import FAILED, OK, Measurement
from sla2cli.ops.geometry import DEFAULT_SPARSITIES


def test_cpu_defaults_of_kernel_mode():
    plan = plan_bench(BenchRequest(device="cpu", providers=("sla2",)))
    assert isinstance(plan, KernelBenchPlan)
    assert plan.shapes == list(CPU_DEFAULT_SHAPES)
    assert plan.sparsities == list(DEFAULT_SPARSITIES) and plan.modes == list(MODES)
    assert (plan.timing.warmup, plan.timing.budget_s) == (CPU_WARMUP, CPU_TIME_BUDGET_S)
    assert plan.dtype == torch.float32 and plan.device.type == "cpu"
    assert [provider.name for provider in plan.providers] == ["sla2"]


def test_given_options_win_and_repeats_collapse():
    plan = plan_bench(BenchRequest(
        device="cpu", shapes=("1,2,256,64", "1,2,256,64"), sparsities=(0.5, 0.5, 0.9), modes=("fwd",),
        providers=("sla2",), warmup=0, time_budget=2.5, dtype="fp16",
    ))
    assert [(s.batch, s.heads, s.length, s.head_dim) for s in plan.shapes] == [(1, 2, 256, 64)]
    assert plan.sparsities == [0.5, 0.9] and plan.modes == ["fwd"]
    assert (plan.timing.warmup, plan.timing.budget_s, plan.dtype) == (0, 2.5, torch.float16)


def test_model_mode_takes_the_first_sparsity():
    plan = plan_bench(BenchRequest(device="cpu", model="embedded", sparsities=(0.9, 0.5), frames=2))
    assert isinstance(plan, ModelBenchPlan)
    assert (plan.model, plan.sparsity, plan.frames) == ("embedded", 0.9, 2)


@pytest.mark.parametrize("request_, option", [
    (BenchRequest(model="embedded", modes=("fwd",)), "--mode"),
    (BenchRequest(scaled_down=True, train_step=True), "--scaled-down, --train-step"),
    (BenchRequest(sparsities=(1.0,)), "--sparsity"),
    (BenchRequest(plot=Path("speed.jpg")), "--plot"),
])
def test_mistakes_name_the_option(request_, option):
    with pytest.raises(ValueError, match=option):  # UserError is a ValueError, as the parameter checks raise
        plan_bench(request_)


def _row(provider: str, status: str) -> Measurement:
    return Measurement(provider=provider, shape="1x2x256x64", sparsity=None, mode="fwd", status=status)


def test_only_sla2_failures_fail_the_command(capsys):
    stderr = Console(stderr=True)
    assert failure_exit_code([_row("sla2", OK), _row("sage", FAILED)], stderr) == 0
    assert "warning:" in capsys.readouterr().err
    assert failure_exit_code([_row("sla2", FAILED), _row("fa2", OK)], stderr) == FAILED_EXIT_CODE
    assert "error:" in capsys.readouterr().err
