"""Soft routing (calibration only): the relaxation, its limit, its rows, its gradients, its memory plan."""

import pytest
import torch

from sla2cli.ops import sla2_reference
from sla2cli.ops import soft as soft_module
from sla2cli.ops.reference import attention_from_block_weights, router_scores
from sla2cli.ops.soft import (
    dense_attention_rows,
    query_block_rows,
    soft_block_weights,
    soft_routing,
    soft_sla2_attention,
)


def make_qkv(length, heads=2, head_dim=64, dtype=torch.float32, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype) for _ in range(3))


@pytest.mark.parametrize("k_sel, scale", [(1, 1.0), (15, 1.0), (15, 50.0), (100, 0.01), (511, 3.0)])
def test_rows_of_m_sum_to_k_sel(k_sel, scale):
    scores = torch.randn(2, 3, 8, 512, generator=torch.Generator().manual_seed(k_sel)) * scale
    weights, log_weights, complement = soft_block_weights(scores, k_sel, tau=0.1)
    assert weights.dtype == torch.float32
    expected = torch.full((2, 3, 8), float(k_sel), dtype=torch.float64)
    torch.testing.assert_close(weights.double().sum(-1), expected, atol=1e-4, rtol=0)
    assert bool(((weights > 0) & (weights < 1)).any())
    torch.testing.assert_close(log_weights.exp(), weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(complement, 1 - weights, atol=1e-6, rtol=1e-5)


def test_m_follows_the_score_order():
    scores = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights, _, _ = soft_block_weights(scores, 5, tau=0.1)
    in_score_order = weights.gather(-1, scores.argsort(dim=-1))
    assert bool((in_score_order.diff(dim=-1) >= 0).all())
    assert torch.equal(weights.topk(5).indices.sort().values, scores.topk(5).indices.sort().values)


def test_all_blocks_kept_gives_ones_and_the_sparse_branch():
    q, k, v = make_qkv(200, dtype=torch.float64)
    routing = soft_routing(q, k, sparsity=0.0)
    assert routing.all_selected and bool((routing.weights == 1).all())
    out = soft_sla2_attention(q, k, v, sparsity=0.0, alpha=torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("length", [300, 512])
def test_matches_the_dense_formula_of_the_reference(length):
    """Same soft map m through the reference's dense L x L formula and through the chunked rows path."""
    q, k, v = make_qkv(length, dtype=torch.float64, seed=1)
    alpha = torch.rand(1, 2, (length + 127) // 128, dtype=torch.float64)
    proj_q = torch.eye(64, dtype=torch.float64) + 0.1 * torch.randn(64, 64, dtype=torch.float64)
    routing = soft_routing(q, k, sparsity=0.5, proj_q=proj_q, tau=0.2)
    out = soft_sla2_attention(q, k, v, sparsity=0.5, alpha=alpha, proj_q=proj_q, tau=0.2)
    expected = attention_from_block_weights(q, k, v, routing.weights, alpha, 128, 64, all_selected=False)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype, tau, atol", [(torch.float64, 1e-6, 1e-10), (torch.float32, 1e-6, 1e-5)])
def test_small_tau_gives_the_hard_reference(dtype, tau, atol):
    q, k, v = make_qkv(520, dtype=dtype, seed=2)
    alpha = torch.rand(1, 2, 5, dtype=dtype)
    blocks = torch.tensor([4, 1, 2])
    out = soft_sla2_attention(q, k, v, sparsity=0.75, alpha=alpha, query_blocks=blocks, tau=tau)
    rows = query_block_rows(520, 128, blocks)
    hard = sla2_reference(q, k, v, sparsity=0.75, alpha=alpha)[:, :, rows]
    torch.testing.assert_close(out, hard, atol=atol, rtol=atol)
    softer = soft_sla2_attention(q, k, v, sparsity=0.75, alpha=alpha, query_blocks=blocks, tau=1.0)
    assert (softer - hard).abs().max() > 100 * atol  # the limit is approached, not already there


def test_subset_rows_equal_rows_of_the_full_computation():
    q, k, v = make_qkv(700, seed=4, batch=2)
    alpha = torch.rand(2, 2, 1)
    full = soft_sla2_attention(q, k, v, sparsity=0.8, alpha=alpha)
    blocks = torch.tensor([5, 0, 3])  # block 5 is the partial last one (60 real rows)
    rows = query_block_rows(700, 128, blocks)
    assert rows.numel() == 60 + 128 + 128
    subset = soft_sla2_attention(q, k, v, sparsity=0.8, alpha=alpha, query_blocks=blocks)
    torch.testing.assert_close(subset, full[:, :, rows], atol=1e-5, rtol=1e-5)


def test_dense_target_rows():
    q, k, v = make_qkv(300, seed=5)
    blocks = torch.tensor([2, 0])
    target = dense_attention_rows(q, k, v, query_blocks=blocks)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(target, full[:, :, query_block_rows(300, 128, blocks)])


def test_gradcheck_with_lambda_held_constant(monkeypatch, one_thread):
    """The backward is exact for the function in which lambda does not move (docs/method.md, section 7)."""
    gen = torch.Generator().manual_seed(6)
    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = (draw(1, 2, 40, 8).requires_grad_() for _ in range(3))
    proj_q = torch.eye(8, dtype=torch.float64) + 0.2 * draw(8, 8)
    proj_k = torch.eye(8, dtype=torch.float64) + 0.2 * draw(8, 8)
    alpha = torch.rand(1, 2, 3, generator=gen, dtype=torch.float64)
    inputs = (q, k, v, proj_q.requires_grad_(), proj_k.requires_grad_(), alpha.requires_grad_())
    kwargs = dict(sparsity=0.5, query_blocks=torch.tensor([2, 0]), tau=0.5, block_q=16, block_k=16)

    solve = soft_module.solve_row_offsets
    frozen = solve(router_scores(q, k, proj_q, proj_k, 16, 16)[:, :, [2, 0]].detach() / 0.5, 1)
    monkeypatch.setattr(soft_module, "solve_row_offsets", lambda logits, k_sel: frozen)

    def fn(q, k, v, proj_q, proj_k, alpha):
        return soft_sla2_attention(q, k, v, proj_q=proj_q, proj_k=proj_k, alpha=alpha, **kwargs)

    def router_and_alpha(proj_q, proj_k, alpha):
        return fn(q.detach(), k.detach(), v.detach(), proj_q, proj_k, alpha)

    assert torch.autograd.gradcheck(router_and_alpha, inputs[3:], eps=1e-6, atol=1e-6)  # every entry
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)  # q, k, v too


def test_gradients_reach_router_alpha_and_inputs():
    q, k, v = (t.requires_grad_() for t in make_qkv(384, seed=7))
    proj_q = torch.eye(64, requires_grad=True)
    proj_k = torch.eye(64, requires_grad=True)
    alpha = torch.full((1, 2, 3), 0.6, requires_grad=True)
    blocks = torch.tensor([1, 2])
    out = soft_sla2_attention(q, k, v, sparsity=0.7, alpha=alpha, proj_q=proj_q, proj_k=proj_k,
                              query_blocks=blocks, tau=0.5)
    target = dense_attention_rows(q.detach(), k.detach(), v.detach(), query_blocks=blocks)
    torch.nn.functional.mse_loss(out, target).backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("proj_q", proj_q), ("proj_k", proj_k), ("alpha", alpha)):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()), name
        assert t.grad.abs().sum() > 0, name
    assert alpha.grad[:, :, 0].abs().sum() == 0  # block 0 was not in the subset
    assert q.grad[:, :, :128].abs().sum() == 0


def test_chunked_steps_equal_one_step(monkeypatch):
    q, k, v = make_qkv(640, heads=3, seed=8)
    proj_q = torch.eye(64, requires_grad=True)
    alpha = torch.full((1, 3, 1), 0.7, requires_grad=True)
    blocks = torch.tensor([4, 0, 2, 1])

    def run():
        proj_q.grad = alpha.grad = None
        out = soft_sla2_attention(q, k, v, sparsity=0.6, alpha=alpha, proj_q=proj_q, query_blocks=blocks)
        out.square().sum().backward()
        return out.detach(), proj_q.grad.clone(), alpha.grad.clone()

    whole = run()
    seen = []
    original = soft_module._soft_chunk

    def spy(q_rows, k, *rest):
        seen.append(q_rows.shape[1] * q_rows.shape[2] * q_rows.shape[3] * k.shape[2])
        return original(q_rows, k, *rest)

    monkeypatch.setattr(soft_module, "_CHUNK_ELEMENTS", 2 * 128 * 640)
    monkeypatch.setattr(soft_module, "_soft_chunk", spy)
    chunked = run()
    assert max(seen) <= 2 * 128 * 640 and len(seen) >= 3 * 2  # several steps per head, forward and recompute
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_plan_bounds_the_attention_matrix_at_calibration_scale():
    """At Wan2.1-1.3B 480p (H=12, L=32760) with 8 query blocks, one step holds one head's rows."""
    heads_per_step, blocks_per_step = soft_module._chunk_plan(1, 12, 8, 128, 32760)
    assert heads_per_step * blocks_per_step * 128 * 32760 <= soft_module._CHUNK_ELEMENTS
    assert (heads_per_step, blocks_per_step) == (1, 8)
    assert soft_module._chunk_plan(1, 12, 256, 128, 32760) == (1, 8)
    assert soft_module._chunk_plan(1, 12, 2, 128, 4096) == (12, 2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(query_blocks=torch.tensor([0, 3])), "query_blocks"),
        (dict(query_blocks=torch.tensor([[0]])), "query_blocks"),
        (dict(query_blocks=torch.tensor([0.0])), "query_blocks"),
        (dict(query_blocks=[0, 1]), "query_blocks"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(alpha=torch.ones(4)), "alpha"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    q, k, v = make_qkv(300)
    call = dict(sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=name):
        soft_sla2_attention(q, k, v, **call)
