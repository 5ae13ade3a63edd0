"""Low-bit sparse branch on a real GPU (skipped without CUDA): the kernel against the fake-quant
oracle (1e-3 relative), the low-bit output against bf16 SLA2, and straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import random_alpha, random_qkv, rel_l2

from sla2cli.ops import route
from sla2cli.ops.attention import sla2_attention_routed
from sla2cli.ops.quantization import QUANT_INT8, QUANT_INT8_FP8, sla2_lowbit_reference, supported_quant_modes

pytestmark = pytest.mark.gpu
MODES = [QUANT_INT8, QUANT_INT8_FP8]


def _inputs(batch, heads, length, head_dim, sparsity, seed):
    q, k, v = random_qkv(batch, heads, length, head_dim, torch.bfloat16, seed, device="cuda")
    routing = route(q.detach(), k.detach(), sparsity=sparsity)
    alpha = random_alpha(batch, heads, routing.lut.shape[2], seed, device="cuda")
    return q, k, v, routing.lut, alpha


def _skip_unsupported(mode):
    if mode not in supported_quant_modes("cuda"):
        pytest.skip(f"{mode} not supported on {torch.cuda.get_device_name()}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("length", "head_dim", "sparsity"), [(4096, 64, 0.9), (4096, 128, 0.97), (4001, 128, 0.9),
                                                              (32760, 128, 0.97)])
def test_kernel_matches_fake_quant_oracle(mode, length, head_dim, sparsity):
    _skip_unsupported(mode)
    batch, heads = (2, 2) if length < 10000 else (1, 1)
    q, k, v, lut, alpha = _inputs(batch, heads, length, head_dim, sparsity, seed=length + head_dim)
    with torch.no_grad():
        out = sla2_attention_routed(q, k, v, lut, alpha=alpha, quant=mode)
        # bf16 inputs, so that the oracle rounds P to bf16 for P.V as the kernel does in int8 mode
        expected = sla2_lowbit_reference(q, k, v, lut, mode=mode, alpha=alpha.float())
        exact = sla2_attention_routed(q, k, v, lut, alpha=alpha)
    # The oracle computes in float32 from the same bf16 inputs and rounds its output to bf16 here.
    kernel_error = rel_l2(out.float(), expected.to(torch.bfloat16).float())
    lowbit_error = rel_l2(out.float(), exact.float())
    print(f"{mode} L={length} D={head_dim} s={sparsity}: kernel vs oracle {kernel_error:.2e}, "
          f"low-bit vs bf16 {lowbit_error:.2e}")
    assert kernel_error <= 1e-3
    assert lowbit_error <= (0.05 if mode == QUANT_INT8_FP8 else 0.02)


@pytest.mark.parametrize("mode", MODES)
def test_straight_through_gradients(mode):
    _skip_unsupported(mode)
    q, k, v, lut, alpha = _inputs(2, 2, 4096, 128, 0.9, seed=7)
    grad = torch.randn_like(q)
    low = sla2_attention_routed(q, k, v, lut, alpha=alpha, quant=mode)
    low_grads = torch.autograd.grad(low, (q, k, v, alpha), grad)
    exact = sla2_attention_routed(q, k, v, lut, alpha=alpha)
    exact_grads = torch.autograd.grad(exact, (q, k, v, alpha), grad)
    errors = [rel_l2(a.float(), e.float()) for a, e in zip(low_grads, exact_grads, strict=True)]
    print(f"{mode} gradient errors (dq, dk, dv, dalpha) vs unquantised: " + ",".join(f"{e:.2e}" for e in errors))
    assert max(errors) <= 0.02
    assert rel_l2(low.float(), exact.float()) > 1e-3  # the forward did quantise
