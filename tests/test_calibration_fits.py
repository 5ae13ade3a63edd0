"""Stage-1 fits on their own: the budgeted soft top-k, the router's mass objective, alpha's exact quadratic."""

from __future__ import annotations

import pytest
import torch

from sla2cli.module import SLA2Attention
from sla2cli.ops import route, sla2_attention_routed
from sla2cli.ops.soft import budgeted_soft_top_k, soft_block_weights, solve_row_offsets
from sla2cli.report.metrics import relative_l2_error
from sla2cli.training.alpha_fit import fit_alpha, mean_relative_error, mix_coefficients
from sla2cli.training.router_fit import hard_captured_mass, router_target, soft_mass_loss, train_router


def test_budgeted_soft_top_k_has_the_forward_of_the_relaxation_and_keeps_the_budget_in_its_gradient():
    scores = torch.randn(2, 3, 4, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = budgeted_soft_top_k(scores.requires_grad_(True), 5, tau=0.3)
    torch.testing.assert_close(weights, soft_block_weights(scores.detach(), 5, tau=0.3)[0], atol=1e-9, rtol=0)
    # the rows' sums do not move, whatever the scores do
    (row_sum_grad,) = torch.autograd.grad(weights.sum(), scores)
    assert row_sum_grad.abs().max().item() < 1e-9
    # and the gradient is that of the relaxation with lambda re-solved (central differences)
    target = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((budgeted_soft_top_k(scores, 5, tau=0.3) * target).sum(), scores)

    def objective(s: torch.Tensor) -> float:
        x = s / 0.3
        return (torch.sigmoid(x + solve_row_offsets(x, 5)) * target).sum().item()

    for index in [(0, 0, 0, 3), (1, 2, 3, 17), (0, 1, 2, 39)]:
        step = torch.zeros_like(scores)
        step[index] = 1e-5
        numeric = (objective(scores.detach() + step) - objective(scores.detach() - step)) / 2e-5
        assert grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("spread", [0.1, 3.0, 300.0])
@pytest.mark.parametrize(("count", "k_sel"), [(40, 1), (512, 15), (512, 511)])
def test_row_offsets_meet_the_budget_on_flat_spread_and_tied_rows(spread, count, k_sel):
    """The solve reaches sum_j sigmoid(x_j + lambda) = k_sel on every row, from rows nearly flat to rows whose
    logits span 1e3 (scores over tau = 0.1), with ties, and gives the weights plain bisection gives. (Where the
    logits are far apart the count is flat in lambda between them, so lambda itself may differ; the weights,
    all monotone in lambda, cannot differ by more than the counts do.)"""
    generator = torch.Generator().manual_seed(count + k_sel)
    logits = spread * torch.randn(3, 7, count, generator=generator, dtype=torch.float64)
    logits[0, 0] = 0.0  # every logit tied
    logits[0, 1, : count // 2] = logits[0, 1, 0]  # half the row tied at one value
    offsets = solve_row_offsets(logits, k_sel)
    counts = torch.sigmoid(logits + offsets).sum(dim=-1)
    assert (counts - k_sel).abs().max().item() <= 1e-10
    low = torch.full_like(offsets, -1e4)
    high = torch.full_like(offsets, 1e4)
    for _ in range(200):  # bisection, the slow way
        middle = 0.5 * (low + high)
        too_many = torch.sigmoid(logits + middle).sum(dim=-1, keepdim=True) > k_sel
        high, low = torch.where(too_many, middle, high), torch.where(too_many, low, middle)
    bisected = torch.sigmoid(logits + 0.5 * (low + high))
    torch.testing.assert_close(torch.sigmoid(logits + offsets), bisected, atol=1e-10, rtol=0)


def test_constant_lambda_gradient_is_the_one_that_breaks_the_budget():
    """The reason for the budgeted version: with lambda constant every score's gradient raises its m."""
    scores = torch.randn(1, 1, 2, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores.requires_grad_(True)
    weights, _, _ = soft_block_weights(scores, 5, tau=0.3)
    (grad,) = torch.autograd.grad(weights.sum(), scores)
    assert bool((grad > 0).all())


def _sharp_inputs(length: int = 512, heads: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, 64, generator=generator) for _ in range(3))
    return 2.0 * q, 2.0 * k, v


def test_mix_coefficients_give_the_error_of_the_routed_op_for_any_alpha():
    q, k, v = _sharp_inputs(length=300)  # partial last query and key blocks
    layer = SLA2Attention(2, 64, sparsity=0.6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    coefficients = mix_coefficients(layer, q, k, v, dense)
    routing = route(q, k, sparsity=0.6)
    assert torch.equal(coefficients.routing.lut, routing.lut)
    for seed in range(3):
        alpha = torch.rand(1, 2, 3, generator=torch.Generator().manual_seed(seed))
        expected = relative_l2_error(sla2_attention_routed(q, k, v, routing.lut, alpha=alpha), dense)
        torch.testing.assert_close(coefficients.relative_error(alpha), expected, atol=1e-5, rtol=1e-4)
    ideal = coefficients.ideal_alpha()
    for value in torch.linspace(0, 1, 11):
        assert bool((coefficients.relative_error(ideal) <= coefficients.relative_error(ideal * 0 + value) + 1e-6).all())


def test_alpha_fit_lowers_the_hard_error_and_moves_only_alpha():
    q, k, v = _sharp_inputs()
    layer = SLA2Attention(2, 64, sparsity=0.75)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    coefficients = [mix_coefficients(layer, q, k, v, dense)]
    before = relative_l2_error(layer(q, k, v), dense).mean().item()
    assert mean_relative_error(layer, coefficients).item() == pytest.approx(before, rel=1e-4)
    router = (layer.proj_q.clone(), layer.proj_k.clone())
    layer.requires_grad_(False)
    fit_alpha(layer, coefficients, steps=100, learning_rate=0.05)
    after = relative_l2_error(layer(q, k, v), dense).mean().item()
    assert after < before - 0.01
    assert torch.equal(layer.proj_q, router[0]) and torch.equal(layer.proj_k, router[1])
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())  # as it was


def _block_structured_inputs(heads: int = 2, seed: int = 0):
    """512 tokens whose query block i attends mostly to key blocks 2i and 2i + 1 (block-level signal)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(heads, 8, 64, generator=generator)  # one direction per key block
    k = torch.randn(1, heads, 512, 64, generator=generator) + 0.6 * centres.repeat_interleave(64, dim=1)[None]
    wanted = (centres[:, 0::2] + centres[:, 1::2]).repeat_interleave(128, dim=1)  # query block i -> 2i, 2i+1
    q = torch.randn(1, heads, 512, 64, generator=generator) + 0.6 * wanted[None]
    return q, k


def test_router_fit_recovers_the_mass_a_scrambled_router_lost():
    q, k = _block_structured_inputs()
    layer = SLA2Attention(2, 64, sparsity=0.75)
    targets = [router_target(q, k, layer, max_chunk_elements=1 << 16)]
    heuristic = hard_captured_mass(layer, targets)
    with torch.no_grad():  # a router that ranks blocks badly: W_k flips the sign of most features
        layer.proj_k.copy_(torch.diag(torch.where(torch.arange(64) < 48, -1.0, 1.0)))
    scrambled = hard_captured_mass(layer, targets)
    loss_before = soft_mass_loss(layer, targets, tau=0.1).item()
    alpha = layer.alpha_bias.clone()
    train_router(layer, targets, steps=150, learning_rate=1e-2, tau=0.1)
    assert soft_mass_loss(layer, targets, tau=0.1).item() < loss_before
    assert scrambled < heuristic - 0.05
    assert hard_captured_mass(layer, targets) > scrambled + 0.05
    assert torch.equal(layer.alpha_bias, alpha)
