"""Stage 1, alpha: fit the alpha predictor to the hard-routing error itself, which is quadratic in alpha.

With the router fixed, each call's hard routing gives the sparse output O_s and the linear output O_l,
and per (batch, head, query block) the SLA2 output is alpha * O_s + (1 - alpha) * O_l. Its squared
error against full attention O, summed over the block's rows and features, is

    e(alpha) = alpha^2 A - 2 alpha B + C,   A = ||O_s - O_l||^2,  B = <O_s - O_l, O - O_l>,  C = ||O - O_l||^2

so two op calls per captured call (alpha = 1 and alpha = 0) give everything the fit needs, for every
query row at once and exactly what inference runs. B / A (clipped to [0, 1]) is the ideal alpha of the
block: a diagnostic of what the per-head predictor could reach. The fit then minimises the quantity the
report shows, the relative L2 error per (call, head), sqrt(sum_blocks e / ||O||^2), averaged: a few
thousand multiply-adds per step, so hundreds of full-batch Adam steps cost well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sla2cli.module import SLA2Attention
from sla2cli.ops import Routing, route, sla2_attention_routed
from sla2cli.ops.blockwise import to_blocks
from sla2cli.training.full_batch import adam_full_batch


@dataclass(frozen=True)
class MixCoefficients:
    """e(alpha) = alpha^2 A - 2 alpha B + C per (B, H, T_m), the dense output's squared norm per (B, H),
    and the routing they belong to (its scores feed the alpha predictor)."""

    routing: Routing
    length: int
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    dense_norm2: torch.Tensor

    def ideal_alpha(self) -> torch.Tensor:
        """Per-block least-squares alpha, clipped to [0, 1]: the best any predictor could do."""
        return (self.b / self.a.clamp_min(torch.finfo(self.a.dtype).tiny)).clamp(0.0, 1.0)

    def relative_error(self, alpha: torch.Tensor) -> torch.Tensor:
        """||alpha O_s + (1 - alpha) O_l - O|| / ||O|| per (B, H) for alpha of shape (B, H, T_m)."""
        squared = (alpha * alpha * self.a - 2.0 * alpha * self.b + self.c).sum(dim=-1).clamp_min(0.0)
        return (squared / self.dense_norm2.clamp_min(torch.finfo(squared.dtype).tiny)).sqrt()


@torch.no_grad()
def mix_coefficients(
    layer: SLA2Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor
) -> MixCoefficients:
    """Route with the layer's router, run both branches alone, reduce to per-block coefficients."""
    routing = route(
        q, k, sparsity=layer.sparsity, proj_q=layer.proj_q, proj_k=layer.proj_k,
        block_q=layer.block_q, block_k=layer.block_k,
    )
    quant = layer.resolved_quant(q)
    kwargs = dict(block_q=layer.block_q, block_k=layer.block_k, quant=quant)
    sparse = sla2_attention_routed(q, k, v, routing.lut, alpha=None, **kwargs).float()
    zeros = torch.zeros(routing.lut.shape[:3], dtype=torch.float32, device=q.device)
    linear = sla2_attention_routed(q, k, v, routing.lut, alpha=zeros, **kwargs).float()
    exact = dense.float()
    # Rows of a partial last block are zero-padded in both differences, so they add nothing.
    difference = to_blocks(sparse - linear, layer.block_q).flatten(3)
    residual = to_blocks(exact - linear, layer.block_q).flatten(3)
    return MixCoefficients(
        routing=routing,
        length=q.shape[2],
        a=(difference * difference).sum(dim=-1),
        b=(difference * residual).sum(dim=-1),
        c=(residual * residual).sum(dim=-1),
        dense_norm2=exact.flatten(2).pow(2).sum(dim=-1),
    )


def predicted_alpha(layer: SLA2Attention, coefficients: MixCoefficients) -> torch.Tensor:
    """The layer's alpha for the routing the coefficients were computed with (ones if all blocks are kept)."""
    if coefficients.routing.all_selected:
        return torch.ones_like(coefficients.a)
    return layer.predict_alpha(coefficients.routing, coefficients.length)


def mean_relative_error(layer: SLA2Attention, coefficients: list[MixCoefficients]) -> torch.Tensor:
    """Relative L2 error of the layer's hard-routing output, averaged over calls and heads."""
    return torch.stack([c.relative_error(predicted_alpha(layer, c)).mean() for c in coefficients]).mean()


def fit_alpha(
    layer: SLA2Attention,
    coefficients: list[MixCoefficients],
    *,
    steps: int,
    learning_rate: float,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Full-batch Adam on the alpha predictor's parameters (w_h, b_h, t_h) against the exact error; their
    requires_grad flags end as they were."""
    adam_full_batch(
        [layer.alpha_weight, layer.alpha_bias, layer.alpha_log_temperature],
        lambda: mean_relative_error(layer, coefficients),
        steps=steps, learning_rate=learning_rate, on_step=on_step,
    )
