"""Triton path (through the interpreter on CPU) against the oracle, forward and backward.

Covers the acceptance matrix: L in {1, 63, 64, 65, 200, 1000} x D in {64, 128} x sparsity in
{0, 0.5, 0.9, 0.97} x {float32, float16}, each case with random alpha; (B, H) cycles through
{1, 2} x {1, 3} so that every length meets batch > 1 and several heads (B * H <= 3 at L = 1000
keeps the interpreter affordable). Gradient errors are relative to max(‖expected‖, 5% ‖grad_out‖):
a query block whose only selected key block holds one token has an analytically zero sparse-branch
dq, where the FlashAttention-style backward leaves ~1e-6 of rounding noise.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import force_tensor_descriptors, random_alpha, random_qkv, rel_l2

from sla2cli.ops import num_blocks, route, sla2_attention, sla2_attention_bshd, sla2_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
LENGTHS = (1, 63, 64, 65, 200, 1000)
SPARSITIES = (0.0, 0.5, 0.9, 0.97)
HEAD_DIMS = (64, 128)
BATCH_HEADS = ((2, 3), (1, 1), (2, 1), (1, 3))
SMALL_BATCH_HEADS = ((2, 1), (1, 3))


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("SLA2_BACKEND", "triton")


def _matrix():
    cases = []
    for index, (length, sparsity, head_dim, dtype) in enumerate(
        itertools.product(LENGTHS, SPARSITIES, HEAD_DIMS, (torch.float32, torch.float16))
    ):
        choices = SMALL_BATCH_HEADS if length >= 1000 else BATCH_HEADS
        batch, heads = choices[index % len(choices)]
        cases.append(pytest.param(batch, heads, length, head_dim, sparsity, dtype,
                                  id=f"B{batch}H{heads}L{length}D{head_dim}s{sparsity}-{str(dtype)[6:]}"))
    return cases


def _outputs_and_grads(fn, q, k, v, alpha, grad):
    out = fn(q, k, v, alpha)
    grads = torch.autograd.grad(out, (q, k, v, alpha), grad, allow_unused=True)
    return (out, *grads)


@pytest.mark.parametrize("batch,heads,length,head_dim,sparsity,dtype", _matrix())
def test_matches_reference(batch, heads, length, head_dim, sparsity, dtype):
    _check_against_reference(batch, heads, length, head_dim, sparsity, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("length,sparsity", [(1000, 0.9), (200, 0.5), (65, 0.5)])
def test_kernels_reading_blocks_through_tensor_descriptors_match_reference(monkeypatch, length, sparsity, head_dim,
                                                                            dtype):
    """The launch option that gathers blocks of rows through tensor descriptors (TMA on a GPU), in the forward
    and both backward kernels: partial last blocks read as zero."""
    from sla2_kernels import common

    force_tensor_descriptors(monkeypatch, head_dim)
    made = []
    build = common.block_descriptor
    monkeypatch.setattr(common, "block_descriptor", lambda x, block: made.append(block) or build(x, block))
    _check_against_reference(2, 1, length, head_dim, sparsity, dtype)
    assert sorted(set(made)) == [64, 128]  # key blocks (forward, query side) and query blocks (key side)


def test_forward_builds_descriptors_only_for_launches_large_enough(monkeypatch):
    """At D = 128 the forward gathers its key blocks through tensor descriptors from MIN_DESCRIPTOR_PAIRS
    (query block, key block) pairs per launch, and through pointers below."""
    from sla2_kernels import common, forward

    made = []
    build = common.block_descriptor
    monkeypatch.setattr(common, "block_descriptor", lambda x, block: made.append(block) or build(x, block))
    q, k, v = random_qkv(1, 2, 1000, 128, torch.float32, 5, requires_grad=False)
    expected = sla2_reference(q, k, v, sparsity=0.5)
    assert rel_l2(sla2_attention(q, k, v, sparsity=0.5), expected) <= TOLERANCE[torch.float32]
    assert made == []  # 2 heads x 8 query blocks x 8 selected blocks: far below the gate
    monkeypatch.setattr(forward, "MIN_DESCRIPTOR_PAIRS", 2 * 8 * 8)
    assert rel_l2(sla2_attention(q, k, v, sparsity=0.5), expected) <= TOLERANCE[torch.float32]
    assert made == [64, 64]  # K and V


@pytest.mark.parametrize("length", [1, 200, 1000])
def test_key_block_states_match_pytorch(length):
    """h_j = phi(K_j)^T V_j and z_j = sum phi(K_j) per key block, stored for a multiple of 8 blocks with zeros
    past the sequence."""
    from sla2_kernels import key_block_states
    from sla2_kernels.numerics import stored_state_blocks

    k, v, _ = random_qkv(2, 3, length, 64, torch.float32, length, requires_grad=False)
    states, norms = key_block_states(k, v, 16)
    stored = stored_state_blocks(num_blocks(length, 16))
    assert states.shape == (2, 3, stored, 64, 64) and norms.shape == (2, 3, stored, 64)
    pad = stored * 16 - length
    phi = torch.nn.functional.pad(torch.softmax(k, dim=-1), (0, 0, 0, pad)).view(2, 3, stored, 16, 64)
    values = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(2, 3, stored, 16, 64)
    assert torch.allclose(states, phi.transpose(-1, -2) @ values, atol=1e-5)
    assert torch.allclose(norms, phi.sum(dim=3), atol=1e-5)


def _check_against_reference(batch, heads, length, head_dim, sparsity, dtype):
    """Output and every gradient of the Triton path against the oracle on random inputs."""
    seed = length * 7 + head_dim + int(sparsity * 100)
    q, k, v = random_qkv(batch, heads, length, head_dim, dtype, seed)
    alpha = random_alpha(batch, heads, num_blocks(length, 128), seed)
    grad = torch.randn(batch, heads, length, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    actual = _outputs_and_grads(lambda *a: sla2_attention(*a[:3], sparsity=sparsity, alpha=a[3]), q, k, v, alpha, grad)
    expected = _outputs_and_grads(lambda *a: sla2_reference(*a[:3], sparsity=sparsity, alpha=a[3]),
                                  q, k, v, alpha, grad)
    floor = 0.05 * grad.float().norm().item()
    errors = {name: rel_l2(a, e, floor=0.0 if name == "out" else floor)
              for name, a, e in zip(("out", "dq", "dk", "dv", "dalpha"), actual, expected, strict=True)}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("length", [65, 130, 200])
def test_sparsity_zero_equals_sdpa(length):
    q, k, v = random_qkv(2, 3, length, 64, torch.float32, 100 + length)
    alpha = random_alpha(2, 3, num_blocks(length, 128), 100 + length)
    out = sla2_attention(q, k, v, sparsity=0.0, alpha=alpha)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_l2(out, expected) <= 1e-5
    grad = torch.randn_like(out)
    for actual, reference in zip(torch.autograd.grad(out, (q, k, v), grad),
                                 torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        assert rel_l2(actual, reference) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("alpha_shape", [(2, 3, 2), (3, 1), ()])
def test_alpha_gets_a_zero_gradient_when_every_block_is_selected(monkeypatch, backend, alpha_shape):
    """No linear branch: alpha does not enter the output, and every path says so with zeros, not None."""
    monkeypatch.setenv("SLA2_BACKEND", "torch" if backend == "torch" else "triton")
    q, k, v = random_qkv(2, 3, 200, 64, torch.float32, 12)
    alpha = torch.rand(alpha_shape, generator=torch.Generator().manual_seed(13)).requires_grad_(True)
    attention = sla2_reference if backend == "reference" else sla2_attention
    out = attention(q, k, v, sparsity=0.0, alpha=alpha)
    (grad_alpha,) = torch.autograd.grad(out.square().sum(), alpha)  # no allow_unused: alpha is in the graph
    assert grad_alpha.shape == alpha.shape and grad_alpha.dtype == alpha.dtype
    assert torch.equal(grad_alpha, torch.zeros_like(alpha))
    out = attention(q, k, v, sparsity=0.0, alpha=alpha)
    out.sum().backward()
    assert alpha.grad is not None and torch.equal(alpha.grad, torch.zeros_like(alpha))
    assert torch.equal(out, attention(q, k, v, sparsity=0.0))  # the output itself does not depend on alpha


def test_without_alpha_is_the_sparse_branch():
    q, k, v = random_qkv(1, 2, 300, 64, torch.float32, 3)
    out = sla2_attention(q, k, v, sparsity=0.5)
    assert rel_l2(out, sla2_reference(q, k, v, sparsity=0.5)) <= 1e-5
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    expected = torch.autograd.grad(sla2_reference(q, k, v, sparsity=0.5), (q, k, v), torch.ones_like(out))
    assert max(rel_l2(a, e) for a, e in zip(grads, expected, strict=True)) <= 1e-5


@pytest.mark.parametrize("alpha_shape", [(), (3, 1), (2, 3, 1)])
def test_broadcast_alpha_gets_its_own_shape_of_gradient(alpha_shape):
    q, k, v = random_qkv(2, 3, 260, 64, torch.float32, 4)
    alpha = torch.rand(alpha_shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = sla2_attention(q, k, v, sparsity=0.5, alpha=alpha)
    expected = sla2_reference(q, k, v, sparsity=0.5, alpha=alpha)
    assert rel_l2(out, expected) <= 1e-5
    (grad_alpha,) = torch.autograd.grad(out.square().sum(), alpha)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), alpha)
    assert grad_alpha.shape == alpha.shape
    assert rel_l2(grad_alpha, expected_grad) <= 1e-5


def test_non_contiguous_inputs_forward_and_backward():
    """Views with gaps (q, k, v unbound from one fused projection) and a strided feature dim."""
    generator = torch.Generator().manual_seed(6)
    fused = torch.randn(2, 150, 3, 3, 64, generator=generator, requires_grad=True)  # (B, L, qkv, H, D)
    q, k, v = (t.transpose(1, 2) for t in fused.unbind(2))  # (B, H, L, D), row stride 3 * H * D
    q_t = torch.randn(2, 3, 64, 150, generator=generator).transpose(-1, -2).requires_grad_(True)
    alpha = torch.rand(2, 3, 2, generator=generator)
    grad = torch.randn(2, 3, 150, 64, generator=generator)
    for query, leaf in ((q, fused), (q_t, q_t)):
        out = sla2_attention(query, k, v, sparsity=0.5, alpha=alpha)
        expected = sla2_reference(query, k, v, sparsity=0.5, alpha=alpha)
        assert rel_l2(out, expected) <= 1e-5
        (actual_grad,) = torch.autograd.grad(out, leaf, grad)
        (expected_grad,) = torch.autograd.grad(expected, leaf, grad)
        assert rel_l2(actual_grad, expected_grad) <= 1e-5


def test_bshd_entry_point_matches_bhld():
    q, k, v = random_qkv(2, 3, 190, 128, torch.float32, 7, requires_grad=False)
    alpha = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(8))
    to_bshd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out = sla2_attention_bshd(*to_bshd, sparsity=0.9, alpha=alpha)
    assert out.shape == (2, 190, 3, 128) and out.is_contiguous()
    expected = sla2_reference(q, k, v, sparsity=0.9, alpha=alpha).transpose(1, 2)
    assert rel_l2(out, expected) <= 1e-5


def test_projections_change_routing_like_the_reference():
    q, k, v = random_qkv(1, 2, 500, 64, torch.float32, 9, requires_grad=False)
    generator = torch.Generator().manual_seed(10)
    proj_q = torch.eye(64) + 0.5 * torch.randn(64, 64, generator=generator)
    proj_k = torch.eye(64) + 0.5 * torch.randn(64, 64, generator=generator)
    plain = route(q, k, sparsity=0.75).lut
    projected = route(q, k, sparsity=0.75, proj_q=proj_q, proj_k=proj_k).lut
    assert not torch.equal(plain, projected)
    alpha = torch.rand(1, 2, 4, generator=generator)
    out = sla2_attention(q, k, v, sparsity=0.75, alpha=alpha, proj_q=proj_q, proj_k=proj_k)
    expected = sla2_reference(q, k, v, sparsity=0.75, alpha=alpha, proj_q=proj_q, proj_k=proj_k)
    assert rel_l2(out, expected) <= 1e-5


def test_compile_fullgraph_traces_without_breaks():
    q, k, v = random_qkv(1, 2, 130, 64, torch.float32, 11)
    alpha = random_alpha(1, 2, 2, 11)

    def attention(q, k, v, alpha):
        return sla2_attention(q, k, v, sparsity=0.5, alpha=alpha) * 2.0

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, alpha)
    out.sum().backward()
    assert rel_l2(out, attention(q, k, v, alpha)) <= 1e-6
    assert alpha.grad is not None and q.grad is not None


def test_backward_reuses_the_forwards_complement_states(monkeypatch):
    """The complement states are built once per forward and backward, not again in the backward."""
    import sla2cli.ops.triton_op as triton_op

    calls = []
    build = triton_op._complement_states
    monkeypatch.setattr(triton_op, "_complement_states", lambda *args: calls.append(1) or build(*args))
    q, k, v = random_qkv(1, 2, 300, 64, torch.float32, 17)
    alpha = random_alpha(1, 2, num_blocks(300, 128), 17)
    out = sla2_attention(q, k, v, sparsity=0.5, alpha=alpha)
    grads = torch.autograd.grad(out, (q, k, v, alpha), torch.ones_like(out))
    assert len(calls) == 1
    expected = sla2_reference(q, k, v, sparsity=0.5, alpha=alpha)
    expected_grads = torch.autograd.grad(expected, (q, k, v, alpha), torch.ones_like(out))
    assert max(rel_l2(a, e) for a, e in zip(grads, expected_grads, strict=True)) <= 1e-5
    with torch.no_grad():
        sla2_attention(q, k, v, sparsity=0.5, alpha=alpha)
    assert len(calls) == 2
