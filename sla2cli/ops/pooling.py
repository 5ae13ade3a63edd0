"""Block means of Q and of smoothed K for the router, on whichever backend the tensors live."""

from __future__ import annotations

import torch

from sla2cli.ops.backend import triton_enabled
from sla2cli.ops.reference import block_means, block_token_counts
from sla2cli.ops.triton_op import block_means_op


def _means(x: torch.Tensor, block: int) -> torch.Tensor:
    if triton_enabled(x):
        return block_means_op(x, block)
    return block_means(x.float(), block)


def pooled_means(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of Q per query block, mean of K - mean(K) per key block), float32, (B, H, T, D).

    The sequence mean of K comes from the block means weighted by their real token counts, so K
    is read once.
    """
    q_pooled = _means(q, block_q)
    k_pooled = _means(k, block_k)
    counts = block_token_counts(k.shape[2], block_k, k.device)
    k_mean = (k_pooled * counts[:, None]).sum(dim=2, keepdim=True) / k.shape[2]
    return q_pooled, k_pooled - k_mean
