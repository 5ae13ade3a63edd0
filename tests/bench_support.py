"""Shared pieces of the `sla2cli.bench` tests: a small CPU case, a quick timing plan, and helpers."""

from __future__ import annotations

import importlib.util
import math

import torch

from sla2cli.bench.cases import FORWARD, AttentionShape
from sla2cli.bench.environment import describe
from sla2cli.bench.inputs import make_inputs
from sla2cli.bench.kernel_mode import KernelBenchPlan, measure
from sla2cli.bench.providers.base import Provider
from sla2cli.bench.providers.dense import DenseProvider
from sla2cli.bench.records import Measurement
from sla2cli.bench.timing import CacheFlusher, TimingPlan
from sla2cli.cli import main

CPU = torch.device("cpu")
SMALL = AttentionShape(1, 2, 512, 64)
QUICK = TimingPlan(warmup=1, repeats=3, budget_s=1.0)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def quick_plan(providers, shape=SMALL, modes=(FORWARD,), sparsities=(0.9,)) -> KernelBenchPlan:
    return KernelBenchPlan(
        shapes=[shape], sparsities=list(sparsities), modes=list(modes), providers=list(providers),
        dtype=torch.float32, device=CPU, timing=QUICK,
    )


def measure_provider(provider: Provider, mode=FORWARD, sparsity=0.9, shape=SMALL) -> Measurement:
    """One measured row of `provider` on CPU, its correctness gate included."""
    plan = quick_plan([provider], shape=shape, modes=(mode,))
    inputs = make_inputs(shape, mode, torch.float32, CPU, seed=0)
    level = None if provider.kind == "dense" else sparsity
    return measure(provider, inputs, level, mode, plan, CacheFlusher(CPU), describe(CPU))


def rounded(sparsity: float, key_blocks: int) -> tuple[int, float]:
    """(k_sel, effective sparsity) by the method's formula: k_sel = max(1, floor((1 - s) * T_n))."""
    k_sel = max(1, math.floor((1 - sparsity) * key_blocks))
    return k_sel, 1 - k_sel / key_blocks


def rows_at(sparsities, shape="1x2x1024x64", key_blocks=16) -> list[Measurement]:
    """A dense row and one SLA2 row per sparsity, with the k_sel and effective sparsity the bench would give."""
    rows = [Measurement("sdpa", shape, None, FORWARD, median_ms=10.0)]
    for sparsity in sparsities:
        k_sel, effective = rounded(sparsity, key_blocks)
        rows.append(Measurement("sla2", shape, sparsity, FORWARD, median_ms=2.0 + sparsity, k_sel=k_sel,
                                key_blocks=key_blocks, effective_sparsity=effective))
    return rows


def exit_code(argv: list[str]) -> int:
    """The exit code of `sla2 <argv>` run through the entry point."""
    try:
        main(argv)
    except SystemExit as done:
        return done.code
    return 0


class Crashes(DenseProvider):
    name = "crashes"
    summary = "test provider"

    def attention(self, q, k, v):
        raise RuntimeError("kernel launch failed\n  on this device")
