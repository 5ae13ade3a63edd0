"""The oracle: SLA2 attention in plain PyTorch with dense L x L masks (docs/method.md, sections 1-5).

Slow and memory-hungry on purpose: every line maps to one sentence of the method, so that the fast
paths can be tested against something obviously right. Computes in float32 (or float64 when given
float64, which tests use) and returns the input dtype.
"""

from __future__ import annotations

import torch

from sla2cli.ops.geometry import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    LINEAR_EPS,
    k_selected,
    num_blocks,
    selects_every_block,
)
from sla2cli.ops.unused_alpha import with_unused_alpha
from sla2cli.ops.validation import check_attention_inputs


def block_token_counts(length: int, block: int, device: torch.device) -> torch.Tensor:
    """Real tokens in each block (the last block may be partial), as float32."""
    starts = torch.arange(num_blocks(length, block), device=device) * block
    return (length - starts).clamp(max=block).to(torch.float32)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of x (B, H, L, D) over the real tokens of each block of `block` rows -> (B, H, T, D)."""
    batch, heads, length, head_dim = x.shape
    blocks = num_blocks(length, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - length))
    sums = padded.reshape(batch, heads, blocks, block, head_dim).sum(dim=3)
    return sums / block_token_counts(length, block, x.device).to(x.dtype)[:, None]


def router_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    proj_q: torch.Tensor | None,
    proj_k: torch.Tensor | None,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """S_c = (mean-pooled Q W_q) . (mean-pooled smoothed K W_k) / sqrt(D), shape (B, H, T_m, T_n)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_pooled = block_means(q.to(compute), block_q)
    k_smoothed = k.to(compute) - k.to(compute).mean(dim=2, keepdim=True)
    k_pooled = block_means(k_smoothed, block_k)
    if proj_q is not None:
        q_pooled = q_pooled @ proj_q.to(compute)
    if proj_k is not None:
        k_pooled = k_pooled @ proj_k.to(compute)
    return q_pooled @ k_pooled.transpose(-1, -2) * q.shape[-1] ** -0.5


def hard_block_mask(scores: torch.Tensor, k_sel: int) -> torch.Tensor:
    """Boolean (B, H, T_m, T_n) map with the top k_sel key blocks of every row set."""
    top = scores.topk(k_sel, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def expand_block_values(values: torch.Tensor, length: int, block: int, dim: int) -> torch.Tensor:
    """Repeat per-block values along `dim` so that every token of a block gets its block's value."""
    return values.repeat_interleave(block, dim=dim).narrow(dim, 0, length)


def attention_from_block_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_weights: torch.Tensor,
    alpha: torch.Tensor | None,
    block_q: int,
    block_k: int,
    all_selected: bool,
) -> torch.Tensor:
    """SLA2 output for a (B, H, T_m, T_n) map m in [0, 1] (0/1 when hard).

    Sparse branch: softmax with each key weighted by its block's m; linear branch: phi-attention
    with each key weighted by 1 - m; mixed per query block by alpha.
    """
    length, head_dim = q.shape[-2], q.shape[-1]
    weights = expand_block_values(block_weights, length, block_q, dim=-2)
    weights = expand_block_values(weights, length, block_k, dim=-1)
    logits = q @ k.transpose(-1, -2) * head_dim**-0.5
    sparse_logits = logits + torch.log(weights)
    out_sparse = torch.softmax(sparse_logits, dim=-1) @ v
    if all_selected:
        return with_unused_alpha(out_sparse, alpha)
    linear_scores = (torch.softmax(q, dim=-1) @ torch.softmax(k, dim=-1).transpose(-1, -2)) * (1.0 - weights)
    out_linear = (linear_scores @ v) / (linear_scores.sum(dim=-1, keepdim=True) + LINEAR_EPS)
    if alpha is None:
        return out_sparse
    batch, heads = q.shape[0], q.shape[1]
    alpha_blocks = alpha.to(q.dtype).expand(batch, heads, num_blocks(length, block_q))
    alpha_rows = expand_block_values(alpha_blocks, length, block_q, dim=-1)[..., None]
    return alpha_rows * out_sparse + (1.0 - alpha_rows) * out_linear


def sla2_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    alpha: torch.Tensor | None = None,
    proj_q: torch.Tensor | None = None,
    proj_k: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """SLA2 attention with hard top-k routing, dense masks, float32 math. Same contract as sla2_attention."""
    if q.dtype != torch.float64:
        check_attention_inputs(
            q, k, v, sparsity=sparsity, alpha=alpha, proj_q=proj_q, proj_k=proj_k,
            block_q=block_q, block_k=block_k,
        )
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    length = q.shape[2]
    num_key_blocks = num_blocks(length, block_k)
    k_sel = k_selected(num_key_blocks, sparsity)
    with torch.no_grad():
        scores = router_scores(qc, kc, proj_q, proj_k, block_q, block_k)
        mask = hard_block_mask(scores, k_sel)
    out = attention_from_block_weights(
        qc, kc, vc, mask.to(compute), alpha, block_q, block_k, all_selected=selects_every_block(k_sel, num_key_blocks)
    )
    return out.to(q.dtype)
