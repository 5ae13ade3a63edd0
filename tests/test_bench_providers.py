"""`sla2cli.bench.providers`: the registry, and each provider's correctness gate before it is timed."""

from __future__ import annotations

import pytest
import torch
from bench_support import CPU, QUICK, installed, measure_provider

import sla2cli.bench.providers.sparse as sparse
from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape
from sla2cli.bench.checks import KernelMismatch, dense_attention_float32
from sla2cli.bench.environment import describe
from sla2cli.bench.inputs import make_inputs
from sla2cli.bench.kernel_mode import KernelBenchPlan, run_kernel_bench
from sla2cli.bench.providers import get_provider, provider_names, select_providers
from sla2cli.bench.providers.dense import DenseProvider
from sla2cli.bench.providers.sparse import Sla2, Sla2Routing, block_mask_from_lut
from sla2cli.bench.records import OK, SKIPPED
from sla2cli.errors import UserError
from sla2cli.ops import route, sla2_attention, sla2_reference
from sla2cli.ops.quantization import sla2_lowbit_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unknown_provider_is_a_user_error():
    with pytest.raises(UserError, match="unknown"):
        get_provider("flash4")
    expected = {"sla2", "sla2-lowbit", "sla2-routing", "fa2", "flash-attn", "cudnn", "flex", "sage", "sdpa"}
    assert expected <= set(provider_names())


@pytest.mark.parametrize("name, module", [("sage", "sageattention"), ("flash-attn", "flash_attn")])
def test_naming_a_provider_that_is_not_installed_is_a_user_error(name, module):
    if installed(module):
        pytest.skip(f"{module} is installed here")
    with pytest.raises(UserError, match="not installed"):
        select_providers([name])
    assert name in [p.name for p in select_providers(None)]  # the default run keeps it, as a skipped row


class _WrongScale(DenseProvider):
    """Dense attention with the softmax scale forgotten: a plausible kernel bug."""

    name = "wrong-scale"
    summary = "test provider"

    def attention(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class _ExactForward(torch.autograd.Function):
    """Identity forward with a doubled gradient: right output, wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _WrongBackward(DenseProvider):
    name = "wrong-backward"
    summary = "test provider"

    def attention(self, q, k, v):
        return dense_attention_float32(_ExactForward.apply(q), k, v).to(q.dtype)


class _WrongBlocks(Sla2):
    """SLA2 that routes at a different sparsity than it claims."""

    name = "wrong-blocks"

    def build(self, inputs, sparsity):
        return lambda: sla2_attention(inputs.q, inputs.k, inputs.v, sparsity=0.5, alpha=inputs.alpha)




def test_a_wrong_dense_kernel_stops_the_bench():
    with pytest.raises(KernelMismatch, match="wrong-scale: output"):
        measure_provider(_WrongScale())


def test_a_wrong_backward_is_caught_in_fwd_bwd_only():
    assert measure_provider(_WrongBackward(), mode=FORWARD).status == OK
    with pytest.raises(KernelMismatch, match="dq"):
        measure_provider(_WrongBackward(), mode=FORWARD_BACKWARD)


def test_sla2_with_other_blocks_than_the_router_picks_is_caught():
    shape = AttentionShape(1, 2, 1024, 64)  # 16 key blocks: 0.9 keeps 1, 0.5 keeps 8
    with pytest.raises(KernelMismatch, match="wrong-blocks: output"):
        measure_provider(_WrongBlocks(), shape=shape)


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_sla2_passes_its_gate_and_is_timed(mode):
    row = measure_provider(get_provider("sla2"), mode=mode, shape=AttentionShape(1, 2, 1000, 64))
    assert row.status == OK and row.median_ms > 0 and row.repeats == 3
    assert row.k_sel == 1 and row.note.startswith("SLA2 op")
    assert row.sparse_tflops == pytest.approx(row.dense_tflops * 1 / 16)


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_lowbit_sla2_passes_its_gate_and_measures_its_error_against_sla2(mode):
    shape = AttentionShape(1, 2, 1000, 64)
    row = measure_provider(get_provider("sla2-lowbit"), mode=mode, sparsity=0.5, shape=shape)
    assert row.status == OK and row.median_ms > 0, row.note
    # it times the low-bit mode whatever auto would run, and says what auto runs here (bf16 on a CPU)
    assert row.quant == "int8" and "; ran int8; auto: none (" in row.note

    inputs = make_inputs(shape, mode, torch.float32, CPU, seed=0)
    q, k, v, alpha = (t.detach() for t in inputs.leaves)
    lut = route(q, k, sparsity=0.5).lut
    lowbit = sla2_lowbit_reference(q, k, v, lut, mode="int8", alpha=alpha)
    exact = sla2_reference(q, k, v, sparsity=0.5, alpha=alpha)
    expected = float((lowbit - exact).norm() / exact.norm())
    assert 0 < row.extra["rel_l2_vs_sla2"] == pytest.approx(expected, rel=1e-3)
    assert measure_provider(get_provider("sla2"), sparsity=0.5, shape=shape).extra["rel_l2_vs_sla2"] is None


def test_lowbit_sla2_that_ignores_the_mode_is_caught(monkeypatch):
    def unquantised(q, k, v, *, quant=None, **kw):
        return sla2_attention(q, k, v, **kw)

    monkeypatch.setattr(sparse, "sla2_attention", unquantised)
    with pytest.raises(KernelMismatch, match="sla2-lowbit: output"):
        measure_provider(get_provider("sla2-lowbit"), sparsity=0.5, shape=AttentionShape(1, 2, 1000, 64))


def test_lowbit_sla2_is_skipped_where_the_device_runs_no_lowbit_mode(monkeypatch):
    monkeypatch.setattr(sparse, "runnable_lowbit_mode", lambda device: "none")
    row = measure_provider(get_provider("sla2-lowbit"))
    assert row.status == SKIPPED and "no low-bit mode" in row.note and row.median_ms is None


def test_routing_gate_rejects_blocks_outside_the_top_k():
    provider = Sla2Routing()
    inputs = make_inputs(AttentionShape(1, 2, 1024, 64), FORWARD, torch.float32, CPU, seed=0)
    lut = route(inputs.q, inputs.k, sparsity=0.9).lut
    provider.verify(inputs, 0.9, lambda: lut)
    worst = route(inputs.q, -inputs.k, sparsity=0.9).lut  # the lowest-scoring blocks instead
    with pytest.raises(KernelMismatch, match="top 1"):
        provider.verify(inputs, 0.9, lambda: worst)


def test_routing_has_no_backward_row():
    row = measure_provider(Sla2Routing(), mode=FORWARD_BACKWARD)
    assert row.status == SKIPPED and "no backward" in row.note and row.median_ms is None


@pytest.mark.parametrize("name", ["fa2", "cudnn", "flex"])
def test_gpu_only_providers_are_skipped_on_cpu_with_a_reason(name):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    row = measure_provider(get_provider(name))
    assert row.status == SKIPPED and row.note == "needs a CUDA GPU"


def test_flex_block_mask_keeps_exactly_the_routed_blocks():
    pytest.importorskip("torch.nn.attention.flex_attention")
    length = 1000  # partial last blocks on both axes
    q, k = torch.randn(1, 2, length, 64), torch.randn(1, 2, length, 64)
    routing = route(q, k, sparsity=0.75)
    num_q_blocks, num_k_blocks = routing.scores.shape[-2:]
    mask = block_mask_from_lut(routing.lut, length, num_k_blocks)
    expected = torch.zeros(1, 2, num_q_blocks, num_k_blocks, dtype=torch.int32)
    expected.scatter_(-1, routing.lut.long(), 1)
    assert torch.equal(mask.to_dense().to(torch.int32), expected)
    assert mask.seq_lengths == (length, length)


@pytest.mark.gpu
def test_gpu_providers_pass_their_gates_on_a_small_shape():
    device = torch.device("cuda")
    plan = KernelBenchPlan(
        shapes=[AttentionShape(1, 4, 4096, 128)], sparsities=[0.9], modes=[FORWARD, FORWARD_BACKWARD],
        providers=select_providers(None), dtype=torch.bfloat16, device=device, timing=QUICK,
    )
    rows = run_kernel_bench(plan, describe(device))
    by_key = {(r.provider, r.mode): r for r in rows}
    for name in ("fa2", "sla2", "flex", "sla2-routing"):
        assert by_key[(name, FORWARD)].status == OK, by_key[(name, FORWARD)].note
    for mode in (FORWARD, FORWARD_BACKWARD):
        lowbit = by_key[("sla2-lowbit", mode)]
        assert lowbit.status == OK, lowbit.note
        assert lowbit.quant == "int8"  # timed on every GPU that runs INT8, whatever auto picks there
        assert "; auto: " in lowbit.note
        assert 0 < lowbit.extra["rel_l2_vs_sla2"] < 0.1
    assert by_key[("sla2", FORWARD)].speedup_vs_fa2 is not None
    assert by_key[("sla2", FORWARD)].peak_mem_mb is not None
