"""Stage 1, router: fit W_q, W_k so that hard top-k keeps the key blocks that truly hold the softmax mass.

The router decides which key blocks get exact attention; everything else goes to the linear branch.
Its target is known exactly for the captured q, k: the true share of each key block in each query
block's softmax mass (`true_block_mass`, computed a few query blocks at a time, never
as an L x L matrix). The objective is the mass the router's selection captures, with top-k relaxed
to `budgeted_soft_top_k` (rows of the relaxation sum to k_sel and the gradient respects that budget):

    loss = - mean over (b, h, query block i) of  sum_j m_ij(S_c) * mass_ij

Why not the soft-routing MSE against full attention (docs/method.md, section 7): measured per layer on the
embedded model at 0.97 (one clip to fit on, alpha refitted afterwards, mean hard-routing error on that clip /
on three others), the MSE with lambda constant in the backward gives 0.535 / 0.567, worse than not training
the router (0.476 / 0.518); with lambda differentiated 0.453 / 0.500; this objective 0.420 / 0.474, next to
routing by the true top-k blocks (0.420 / 0.434), at a tenth of the cost: it needs only block means
and block masses, so a step over all captured calls of a layer costs next to nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sla2cli.module import SLA2Attention
from sla2cli.ops.geometry import k_selected, num_blocks
from sla2cli.ops.pooling import pooled_means
from sla2cli.ops.routing import pooled_scores, select_blocks
from sla2cli.ops.soft import budgeted_soft_top_k
from sla2cli.report.metrics import captured_mass, true_block_mass
from sla2cli.training.full_batch import adam_full_batch


@dataclass(frozen=True)
class RouterTarget:
    """What the router sees of one call (block means) and what it should find (true block masses).

    q_pooled: (B, H, T_m, D) query block means; k_pooled: (B, H, T_n, D) block means of smoothed K;
    block_mass: (B, H, T_m, T_n) share of each query block's softmax mass held by each key block.
    """

    q_pooled: torch.Tensor
    k_pooled: torch.Tensor
    block_mass: torch.Tensor
    k_sel: int


@torch.no_grad()
def router_target(q: torch.Tensor, k: torch.Tensor, layer: SLA2Attention, max_chunk_elements: int) -> RouterTarget:
    """Block means and true block masses of one captured call (float32; bounded memory)."""
    q_pooled, k_pooled = pooled_means(q, k, layer.block_q, layer.block_k)
    mass = true_block_mass(q, k, block_q=layer.block_q, block_k=layer.block_k, max_chunk_elements=max_chunk_elements)
    k_sel = k_selected(num_blocks(q.shape[2], layer.block_k), layer.sparsity)
    return RouterTarget(q_pooled.float(), k_pooled.float(), mass.float(), k_sel)


def router_scores_of(layer: SLA2Attention, target: RouterTarget) -> torch.Tensor:
    """S_c of the layer's current router for a target's block means (differentiable in W_q, W_k)."""
    return pooled_scores(target.q_pooled, target.k_pooled, layer.proj_q, layer.proj_k)


@torch.no_grad()
def hard_captured_mass(layer: SLA2Attention, targets: list[RouterTarget]) -> float:
    """True softmax mass inside the hard top-k blocks of the layer's router, averaged over calls and rows."""
    values = [
        captured_mass(target.block_mass, select_blocks(router_scores_of(layer, target), target.k_sel)).mean().item()
        for target in targets
    ]
    return sum(values) / len(values)


def soft_mass_loss(layer: SLA2Attention, targets: list[RouterTarget], tau: float) -> torch.Tensor:
    """Negative soft-captured mass, averaged over the calls (the router's training objective)."""
    losses = []
    for target in targets:
        weights = budgeted_soft_top_k(router_scores_of(layer, target), target.k_sel, tau)
        losses.append(-(weights * target.block_mass).sum(dim=-1).mean())
    return torch.stack(losses).mean()


def train_router(
    layer: SLA2Attention,
    targets: list[RouterTarget],
    *,
    steps: int,
    learning_rate: float,
    tau: float,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Adam on proj_q and proj_k only, full batch over the layer's calls; alpha is fitted afterwards. Their
    requires_grad flags end as they were."""
    adam_full_batch(
        [layer.proj_q, layer.proj_k], lambda: soft_mass_loss(layer, targets, tau),
        steps=steps, learning_rate=learning_rate, on_step=on_step,
    )
