"""Hard routing: which key blocks each query block sends to the exact branch.

The scores use block means of Q and of smoothed K. On the Triton path three kernels pool, score and
select (sla2_kernels.routing) for rows of up to sla2_kernels.routing.MAX_KERNEL_KEY_BLOCKS key blocks;
elsewhere PyTorch does the same math step by step, with top-k on the (B, H, T_m, T_n) score map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sla2_kernels
from sla2cli.ops.backend import triton_enabled
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, k_selected, num_blocks, selects_every_block
from sla2cli.ops.pooling import pooled_means
from sla2cli.ops.triton_op import route_op


@dataclass(frozen=True)
class Routing:
    """Result of hard routing.

    scores: (B, H, T_m, T_n) float32 router scores S_c.
    lut: (B, H, T_m, k_sel) int32 indices of the selected key blocks, ascending per row.
    k_sel: selected key blocks per row (from shapes alone, never from data).
    """

    scores: torch.Tensor
    lut: torch.Tensor
    k_sel: int

    @property
    def all_selected(self) -> bool:
        return selects_every_block(self.k_sel, self.scores.shape[-1])


def pooled_scores(
    q_pooled: torch.Tensor,
    k_pooled_smoothed: torch.Tensor,
    proj_q: torch.Tensor | None,
    proj_k: torch.Tensor | None,
) -> torch.Tensor:
    """S_c from block means: (qbar W_q) . (kbar~ W_k) / sqrt(D)."""
    if proj_q is not None:
        q_pooled = q_pooled @ proj_q.to(q_pooled.dtype)
    if proj_k is not None:
        k_pooled_smoothed = k_pooled_smoothed @ proj_k.to(k_pooled_smoothed.dtype)
    return q_pooled @ k_pooled_smoothed.transpose(-1, -2) * q_pooled.shape[-1] ** -0.5


def combined_projection(proj_q: torch.Tensor | None, proj_k: torch.Tensor | None) -> torch.Tensor | None:
    """W = W_q W_k^T (float32): (qbar W_q) . (kbar W_k) = (qbar W) . kbar, one D x D product per query block."""
    if proj_q is None and proj_k is None:
        return None
    proj_q = proj_q.float() if proj_q is not None else None
    proj_k = proj_k.float() if proj_k is not None else None
    if proj_k is None:
        return proj_q
    return proj_k.t() if proj_q is None else proj_q @ proj_k.t()


def select_blocks(scores: torch.Tensor, k_sel: int) -> torch.Tensor:
    """Top k_sel key blocks per row as an ascending int32 look-up table."""
    top = scores.topk(k_sel, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values.to(torch.int32)


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sparsity: float,
    proj_q: torch.Tensor | None = None,
    proj_k: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> Routing:
    """Hard routing of docs/method.md, section 2 (no gradient: top-k has none).

    The scores are float32 whatever the caller's autocast: under it the projection and score products
    would run in bf16 (and the score kernel would get a bf16 W beside its float32 block means)."""
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        num_k_blocks = num_blocks(q.shape[2], block_k)
        k_sel = k_selected(num_k_blocks, sparsity)
        if triton_enabled(q) and sla2_kernels.routes_in_kernel(num_k_blocks):
            scores, lut = route_op(q, k, combined_projection(proj_q, proj_k), block_q, block_k, k_sel)
            return Routing(scores=scores, lut=lut, k_sel=k_sel)
        q_pooled, k_pooled_smoothed = pooled_means(q, k, block_q, block_k)
        scores = pooled_scores(q_pooled, k_pooled_smoothed, proj_q, proj_k)
        return Routing(scores=scores, lut=select_blocks(scores, k_sel), k_sel=k_sel)
