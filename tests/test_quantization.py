"""Low-bit sparse branch on CPU: rounding helpers, mode resolution, the fake-quant oracle against the
unquantised op, the Triton kernels (interpreter: quantisation passes, INT8 Q.K with P.V in the input
type) against the oracle, and the straight-through gradients."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from kernel_cases import random_alpha, random_qkv, rel_l2

from sla2cli.ops import num_blocks, route, sla2_attention
from sla2cli.ops.attention import sla2_attention_routed
from sla2cli.ops.lowbit_speed import MEASUREMENTS, find_measurement
from sla2cli.ops.quantization import (
    QUANT_INT8,
    QUANT_INT8_FP8,
    channel_gains,
    choose_auto_quant,
    lowbit_sparse_branch,
    needs_backward,
    quantize_int8_blocks,
    quantize_int8_rows,
    quantize_queries_keys,
    resolve_quant_mode,
    round_half_away,
    sla2_lowbit_reference,
    smooth_keys,
    supported_quant_modes,
    to_fp8,
    value_channel_scales,
)

KERNEL_TOLERANCE = 1e-3
GRADIENT_FLOOR = 0.05


def test_rounding_helpers():
    assert round_half_away(torch.tensor([-2.5, -1.49, 0.5, 1.5, 126.6])).tolist() == [-3, -1, 1, 2, 127]
    x = torch.randn(2, 3, 50, 64) * 3 + 1
    values, scale = quantize_int8_rows(x)
    assert values.abs().max() <= 127 and torch.equal(values, values.round())
    assert ((values * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-6).all()
    # e4m3 keeps 3 mantissa bits; 31.4 rounds up across the binade to 32.
    assert to_fp8(torch.tensor([31.4, 0.3, 447.0, 1e-3])).tolist() == [32.0, 0.3125, 448.0, 0.001953125]
    v = torch.randn(2, 2, 40, 8)
    assert torch.allclose(value_channel_scales(v) * 448, v.abs().amax(dim=2))
    assert smooth_keys(v).mean(dim=2).abs().max() < 1e-6
    blocks, block_scale = quantize_int8_blocks(x, 16)  # 50 rows: blocks of 16, the last one partial
    assert blocks.shape == (2, 3, 4, 16, 64) and block_scale.shape == (2, 3, 4)
    assert torch.equal(blocks.abs().amax(dim=(-1, -2)), torch.full((2, 3, 4), 127.0))
    assert (blocks[:, :, -1, 2:] == 0).all()  # padding rows stay zero
    gains = channel_gains(smooth_keys(v))
    assert torch.allclose(gains**2, smooth_keys(v).abs().amax(dim=2, keepdim=True))


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


SMALL_D128 = (1, 12, 32760, 128)  # Wan2.1-1.3B at 480p
LARGE_D128 = (1, 40, 75600, 128)  # Wan2.1-14B at 720p


def test_mode_resolution_and_errors(monkeypatch):
    assert supported_quant_modes("cpu") == ("none", "int8", "int8-fp8")
    assert resolve_quant_mode("auto", "cpu", SMALL_D128) == "none"  # emulated on a CPU: never faster
    assert resolve_quant_mode("int8", "cpu") == "int8"
    assert resolve_quant_mode(None, "cpu") == "none"
    with pytest.raises(ValueError, match="one of none, int8, int8-fp8, auto"):
        resolve_quant_mode("int4", "cpu")
    with pytest.raises(ValueError, match="needs the attention shape"):
        resolve_quant_mode("auto", "cpu")
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert resolve_quant_mode("int8", "cuda") == "int8"
    with pytest.raises(ValueError, match=r"int8-fp8.*A100-SXM4-80GB, compute capability 8.0.*supports: none, int8"):
        resolve_quant_mode("int8-fp8", "cuda")
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert resolve_quant_mode("int8-fp8", "cuda") == "int8-fp8"  # explicit requests run as asked
    assert resolve_quant_mode("int8", "cuda", SMALL_D128) == "int8"
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(ValueError, match="supports: none"):
        resolve_quant_mode("int8", "cuda")


@pytest.mark.parametrize(
    ("gpu", "shape", "training", "mode"),
    [
        ("NVIDIA H100 80GB HBM3", LARGE_D128, False, "int8"),  # the H100's one measured win: 16.49 vs 17.46 ms
        ("NVIDIA H100 80GB HBM3", (2, 20, 75600, 128), False, "int8"),  # same shape class
        ("NVIDIA H100 80GB HBM3", SMALL_D128, False, "none"),
        ("NVIDIA H100 80GB HBM3", SMALL_D128, True, "none"),
        ("NVIDIA H100 80GB HBM3", LARGE_D128, True, "none"),  # training at 14B: not measured
        ("NVIDIA H100 80GB HBM3", (1, 24, 32760, 64), False, "none"),
        ("NVIDIA H200", SMALL_D128, False, "none"),
        ("NVIDIA H200", SMALL_D128, True, "none"),
        ("NVIDIA H200", LARGE_D128, False, "int8"),  # 16.09 vs 17.60 ms
        ("NVIDIA H200", LARGE_D128, True, "none"),  # training: 97.1 vs 88.3 ms
        ("NVIDIA B200", LARGE_D128, False, "none"),  # unknown GPU
    ],
)
def test_auto_follows_the_recorded_measurements(monkeypatch, gpu, shape, training, mode):
    _fake_gpu(monkeypatch, gpu, (9, 0))
    decision = choose_auto_quant("cuda", shape, training)
    assert decision.mode == mode
    assert resolve_quant_mode("auto", "cuda", shape, training=training) == mode
    assert decision.reason.startswith(f"auto: {'bf16' if mode == 'none' else mode} (") and gpu in decision.reason
    entry = find_measurement(gpu, shape[3], training, shape[0] * shape[1] * shape[2])
    if entry is None:
        assert "no recorded measurement" in decision.reason
    else:
        assert entry.source in decision.reason and (entry.mode == mode) == entry.lowbit_faster


def test_auto_never_picks_a_mode_the_gpu_cannot_run(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H100 (capability reported low)", (7, 5))
    assert choose_auto_quant("cuda", LARGE_D128, training=False).mode == "none"


def test_every_measurement_names_an_existing_csv_that_holds_its_numbers():
    root = Path(__file__).resolve().parents[1]
    for entry in MEASUREMENTS:
        text = (root / entry.source).read_text()
        assert entry.shape in text and entry.gpu in text, entry
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", text)]
        for value in (entry.lowbit, entry.bf16):  # the entry rounds a number of its CSV
            assert any(abs(number - value) <= 1e-4 * value for number in numbers), (entry, value)
    keys = [(e.gpu, e.head_dim, e.training, e.shape_class) for e in MEASUREMENTS]
    assert len(keys) == len(set(keys))  # one entry decides each case


def test_training_means_a_call_that_records_a_graph():
    q = torch.zeros(1)
    assert not needs_backward(q, None)
    assert needs_backward(q.requires_grad_(True))
    with torch.no_grad():
        assert not needs_backward(q)


def test_unknown_mode_is_refused_by_the_op():
    q, k, v = random_qkv(1, 1, 128, 64, torch.float32, 0, requires_grad=False)
    with pytest.raises(ValueError, match="quant must be one of"):
        sla2_attention(q, k, v, sparsity=0.5, quant="fp4")


@pytest.mark.parametrize("mode", [QUANT_INT8, QUANT_INT8_FP8])
def test_oracle_online_loop_matches_one_shot_softmax(mode):
    """The LUT-order loop (running max, P rounded per block) equals one softmax over the same
    dequantised logits up to the rounding of P, which the running max moves by at most one step."""
    q, k, v = random_qkv(2, 3, 300, 64, torch.float32, 1, requires_grad=False)
    lut = route(q, k, sparsity=0.5).lut
    q_int, q_scale, k_int, k_scale = quantize_queries_keys(q, k, 64)
    k_dequantised = (k_int * k_scale[..., None, None]).flatten(2, 3)[:, :, :300]
    logits = (q_int * q_scale[..., None]) @ k_dequantised.transpose(-1, -2) / math.sqrt(64)
    selected = torch.zeros(*lut.shape[:-1], num_blocks(300, 64), dtype=torch.bool).scatter_(-1, lut.long(), True)
    keep = selected.repeat_interleave(128, dim=-2)[..., :300, :].repeat_interleave(64, dim=-1)[..., :300]
    probabilities = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    one_shot = probabilities @ v
    loop = lowbit_sparse_branch(q, k, v, lut, 128, 64, mode)
    bound = 0.05 if mode == QUANT_INT8_FP8 else 2e-3  # FP8 P and V carry 3 mantissa bits
    assert rel_l2(loop, one_shot) <= bound


@pytest.mark.parametrize(("length", "head_dim"), [(1000, 64), (777, 128)])
def test_oracle_stays_close_to_the_unquantised_op(length, head_dim):
    q, k, v = random_qkv(2, 3, length, head_dim, torch.float32, 2, requires_grad=False)
    routing = route(q, k, sparsity=0.9)
    alpha = random_alpha(2, 3, routing.lut.shape[2], 2).detach() * 0.5 + 0.5
    exact = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha)
    errors = {}
    for mode in (QUANT_INT8, QUANT_INT8_FP8):
        errors[mode] = rel_l2(sla2_lowbit_reference(q, k, v, routing.lut, mode=mode, alpha=alpha), exact)
    # Measured on these standard-normal inputs: ~1.2% (INT8 Q.K) and ~3.6% (plus FP8 P.V).
    assert 1e-3 < errors[QUANT_INT8] <= 0.02, errors
    assert errors[QUANT_INT8] < errors[QUANT_INT8_FP8] <= 0.05, errors


CASES = [(63, 64, torch.float32, 0.5), (200, 128, torch.float16, 0.5), (1000, 64, torch.float32, 0.9),
         (65, 128, torch.float32, 0.0), (1000, 128, torch.float16, 0.97)]


@pytest.mark.parametrize(("length", "head_dim", "dtype", "sparsity"), CASES)
def test_interpreted_kernel_matches_oracle(monkeypatch, length, head_dim, dtype, sparsity):
    """INT8 Q.K + P.V in the input's type through the Triton interpreter. FP8 is checked on the GPU only: the
    interpreter's float32 -> e4m3 conversion drops the carry into the next binade (31.4 -> 16)."""
    monkeypatch.setenv("SLA2_BACKEND", "triton")
    batch, heads = (2, 1) if length % 2 else (1, 3)
    q, k, v = random_qkv(batch, heads, length, head_dim, dtype, length, requires_grad=False)
    routing = route(q, k, sparsity=sparsity)
    alpha = random_alpha(batch, heads, routing.lut.shape[2], length).detach()
    out = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha, quant=QUANT_INT8)
    expected = sla2_lowbit_reference(q, k, v, routing.lut, mode=QUANT_INT8, alpha=alpha)
    bound = KERNEL_TOLERANCE if dtype == torch.float32 else 2e-3  # fp16 output rounding
    assert out.dtype == dtype and rel_l2(out.float(), expected.float()) <= bound


@pytest.mark.parametrize(("length", "head_dim"), [(200, 64), (129, 128)])
def test_quantisation_passes_match_the_helpers(length, head_dim):
    """The statistics and quantisation kernels (interpreted) against the oracle's helpers."""
    from sla2_kernels.quantize import quantize_operands

    q, k, v = random_qkv(2, 2, length, head_dim, torch.float32, 7, requires_grad=False)
    k = k + torch.randn(head_dim)  # a per-channel offset for the smoothing to remove
    ops = quantize_operands(q, k, v, 128, 64, fp8_values=False)
    q_int, q_scale, k_int, k_scale = quantize_queries_keys(q, k, 64)
    assert torch.allclose(ops.query_scale[:, :, :length], q_scale, rtol=1e-5)
    assert torch.allclose(ops.key_scale, k_scale, rtol=1e-5)
    # A rounding tie may land on either side when the float32 statistics differ in the last bit.
    assert (ops.query_int8[:, :, :length].float() - q_int).abs().max() <= 1
    assert (ops.query_int8[:, :, :length].float() != q_int).float().mean() < 1e-3
    keys = ops.key_int8.view_as(k_int).float()
    assert (keys - k_int).abs().max() <= 1 and (keys != k_int).float().mean() < 1e-3
    assert (ops.query_int8[:, :, length:] == 0).all() and (ops.key_int8[:, :, length:] == 0).all()


def _gradients(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_straight_through_gradients_match_the_unquantised_op(monkeypatch, backend):
    monkeypatch.setenv("SLA2_BACKEND", backend)
    q, k, v = random_qkv(2, 2, 300, 64, torch.float32, 5)
    routing = route(q.detach(), k.detach(), sparsity=0.5)
    alpha = random_alpha(2, 2, routing.lut.shape[2], 5)
    mode = QUANT_INT8 if backend == "triton" else QUANT_INT8_FP8
    low = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha, quant=mode)
    grad = torch.randn_like(low)
    low_grads = _gradients(low, (q, k, v, alpha), grad)
    exact = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha)
    exact_grads = _gradients(exact, (q, k, v, alpha), grad)
    floor = GRADIENT_FLOOR * grad.norm().item()
    errors = [rel_l2(a, e, floor) for a, e in zip(low_grads, exact_grads, strict=True)]
    if backend == "torch":  # the CPU path's straight-through estimate is exactly the unquantised gradient
        assert max(errors) == 0.0, errors
    else:  # the same backward kernels, fed the same statistics: equal up to float32 rounding
        assert max(errors) <= 1e-5, errors
    assert rel_l2(low, exact) > 1e-4  # and the forward did quantise
