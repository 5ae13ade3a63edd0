"""SLA2 attention in PyTorch without an L x L matrix: the CPU path.

Gathers each query block's selected key blocks (memory ~ L * k_sel * 64 * D) and builds the linear
branch from per-key-block states h_j = phi(K_j)^T V_j, so a laptop can run converted models at
realistic lengths. Autograd comes from PyTorch. Computes in float32.
"""

from __future__ import annotations

import torch

from sla2cli.ops.geometry import LINEAR_EPS, num_blocks, selects_every_block
from sla2cli.ops.unused_alpha import with_unused_alpha

_CHUNK_ELEMENTS = 1 << 24  # bound on gathered key elements per step (64 MiB in float32)


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, T, block, D), zero rows past the end."""
    batch, heads, length, head_dim = x.shape
    blocks = num_blocks(length, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - length))
    return padded.reshape(batch, heads, blocks, block, head_dim)


def _gather_blocks(blocks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """blocks (B, H, T, ...), lut (B, H, c, k) -> (B, H, c, k, ...)."""
    batch, heads, count, k_sel = lut.shape
    trailing = blocks.shape[3:]
    flat_index = lut.reshape(batch, heads, count * k_sel).long()
    index = flat_index.reshape(batch, heads, count * k_sel, *([1] * len(trailing))).expand(
        batch, heads, count * k_sel, *trailing
    )
    return blocks.gather(2, index).reshape(batch, heads, count, k_sel, *trailing)


def blockwise_sla2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """SLA2 output for a given look-up table of selected key blocks (B, H, T_m, k_sel)."""
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = num_blocks(length, block_q), num_blocks(length, block_k)
    k_sel = lut.shape[-1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if selects_every_block(k_sel, num_k_blocks):  # plain softmax attention, no gathers
        return with_unused_alpha(torch.nn.functional.scaled_dot_product_attention(qf, kf, vf).to(q.dtype), alpha)
    sparse_only = alpha is None  # alpha = 1: the linear branch has no weight
    key_valid = (torch.arange(num_k_blocks * block_k, device=q.device) < length).reshape(num_k_blocks, block_k)
    q_blocks = to_blocks(qf, block_q)
    k_blocks, v_blocks = to_blocks(kf, block_k), to_blocks(vf, block_k)
    if not sparse_only:
        phi_k_blocks = to_blocks(torch.softmax(kf, dim=-1), block_k) * key_valid[..., None]
        states = phi_k_blocks.transpose(-1, -2) @ v_blocks  # (B, H, T_n, D, D)
        normalisers = phi_k_blocks.sum(dim=-2)  # (B, H, T_n, D)
        total_state, total_normaliser = states.sum(dim=2), normalisers.sum(dim=2)
        alpha = alpha.float().expand(batch, heads, num_q_blocks)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * k_sel * block_k * head_dim))
    outputs = []
    for start in range(0, num_q_blocks, chunk):
        stop = min(num_q_blocks, start + chunk)
        lut_chunk = lut[:, :, start:stop]
        q_chunk = q_blocks[:, :, start:stop]  # (B, H, c, bq, D)
        keys = _gather_blocks(k_blocks, lut_chunk).flatten(3, 4)  # (B, H, c, k*bk, D)
        values = _gather_blocks(v_blocks, lut_chunk).flatten(3, 4)
        valid = key_valid[lut_chunk.long()].flatten(3, 4)  # (B, H, c, k*bk)
        logits = q_chunk @ keys.transpose(-1, -2) * head_dim**-0.5
        logits = logits.masked_fill(~valid[..., None, :], float("-inf"))
        out = torch.softmax(logits, dim=-1) @ values
        if not sparse_only:
            state = total_state[:, :, None] - _gather_blocks(states, lut_chunk).sum(dim=3)
            normaliser = total_normaliser[:, :, None] - _gather_blocks(normalisers, lut_chunk).sum(dim=3)
            phi_q = torch.softmax(q_chunk, dim=-1)
            linear = (phi_q @ state) / ((phi_q * normaliser[..., None, :]).sum(-1, keepdim=True) + LINEAR_EPS)
            mix = alpha[:, :, start:stop, None, None]
            out = mix * out + (1.0 - mix) * linear
        outputs.append(out)
    out = torch.cat(outputs, dim=2).reshape(batch, heads, num_q_blocks * block_q, head_dim)
    return out[:, :, :length].to(q.dtype)
