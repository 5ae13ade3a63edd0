"""SLA2 on a few query blocks in memory independent of the sequence length: what the bench's checks run.

The full oracles hold L x L (ops.reference) or L x k_sel x 64 x D (ops.blockwise) values, which at
75600 tokens need more memory than the op they check. Every output row of SLA2 depends on its own
query row, the key blocks its query block selected, and the whole sequence only through two sums
(the linear branch's total state phi(K)^T V and normaliser sum phi(K)); so the output of a few query
blocks needs those blocks' selected keys plus one pass over K and V in chunks of KEY_CHUNK tokens.
Memory: query rows x selected keys of one row, plus KEY_CHUNK x D; nothing of size L x L or L x D
beyond views of the inputs. Float32 math, differentiable (the gradient check runs autograd through it;
its backward keeps phi of each key chunk, so it holds O(L x D) per checked head).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sla2cli.ops.geometry import LINEAR_EPS, num_blocks, selects_every_block
from sla2cli.ops.unused_alpha import with_unused_alpha

KEY_CHUNK = 4096  # tokens per step of the passes over the whole sequence


class QueryBlockSample(NamedTuple):
    """Query blocks (1-D, ascending) and their real token rows; slots place each row in the blocks' padded
    (n * block_q) layout."""

    blocks: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor


def sample_query_blocks(length: int, block_q: int, count: int, device: torch.device) -> QueryBlockSample:
    """`count` query blocks spread evenly from the first to the last (partial) one, and their rows."""
    total = num_blocks(length, block_q)
    blocks = torch.linspace(0, total - 1, min(count, total), device=device).round().long().unique()
    offsets = torch.arange(block_q, device=device)
    rows = (blocks[:, None] * block_q + offsets).flatten()
    slots = torch.arange(rows.numel(), device=device)
    valid = rows < length
    return QueryBlockSample(blocks, rows[valid], slots[valid])


def gather_key_rows(x: torch.Tensor, lut: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of the key blocks in lut (B, H, n, k_sel) from x (B, H, L, D): (B, H, n, k_sel * block_k, D)
    in x's dtype, and which of them are real tokens (B, H, n, k_sel * block_k); padding rows are zero."""
    batch, heads, count, k_sel = lut.shape
    length, dim = x.shape[2], x.shape[3]
    tokens = (lut.long()[..., None] * block_k + torch.arange(block_k, device=x.device)).flatten(-2)
    valid = tokens < length
    index = tokens.clamp(max=length - 1).reshape(batch, heads, count * k_sel * block_k, 1).expand(-1, -1, -1, dim)
    gathered = x.gather(2, index).reshape(batch, heads, count, k_sel * block_k, dim)
    return gathered * valid[..., None].to(x.dtype), valid


def chunk_starts(length: int) -> range:
    return range(0, length, KEY_CHUNK)


def linear_totals(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j phi(k_j)^T v_j (B, H, D, D) and sum_j phi(k_j) (B, H, D) over every key, float32, in chunks."""
    state = k.new_zeros(*k.shape[:2], k.shape[3], v.shape[3], dtype=torch.float32)
    normaliser = k.new_zeros(*k.shape[:2], k.shape[3], dtype=torch.float32)
    for start in chunk_starts(k.shape[2]):
        phi_k = torch.softmax(k[:, :, start:start + KEY_CHUNK].float(), dim=-1)
        state = state + phi_k.transpose(-1, -2) @ v[:, :, start:start + KEY_CHUNK].float()
        normaliser = normaliser + phi_k.sum(dim=2)
    return state, normaliser


def to_query_blocks(q_rows: torch.Tensor, sample: QueryBlockSample, block_q: int) -> torch.Tensor:
    """Rows (B, H, R, D) into the sampled blocks' layout (B, H, n, block_q, D), zero past the end."""
    batch, heads, _, dim = q_rows.shape
    count = sample.blocks.numel()
    padded = q_rows.new_zeros(batch, heads, count * block_q, dim).index_copy(2, sample.slots, q_rows)
    return padded.reshape(batch, heads, count, block_q, dim)


def from_query_blocks(blocks: torch.Tensor, sample: QueryBlockSample) -> torch.Tensor:
    """(B, H, n, block_q, D) back to the real rows (B, H, R, D)."""
    return blocks.flatten(2, 3).index_select(2, sample.slots)


def sla2_sampled(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    sample: QueryBlockSample,
    block_q: int,
    block_k: int,
    sparse_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLA2's output on the sampled rows, (B, H, R, D) float32, for the full look-up table lut (B, H, T_m, k_sel)
    and alpha (B, H, T_m) or None (sparse branch only). `sparse_rows` replaces the sparse branch's output
    (the low-bit oracle's, for instance); the linear branch and the mix stay these."""
    length, dim = k.shape[2], k.shape[3]
    lut_rows = lut.index_select(2, sample.blocks)
    keys, valid = gather_key_rows(k.float(), lut_rows, block_k)
    values, _ = gather_key_rows(v.float(), lut_rows, block_k)
    q_blocks = to_query_blocks(q_rows.float(), sample, block_q)
    if sparse_rows is None:
        logits = (q_blocks @ keys.transpose(-1, -2)) * dim**-0.5
        logits = logits.masked_fill(~valid[..., None, :], float("-inf"))
        sparse = from_query_blocks(torch.softmax(logits, dim=-1) @ values, sample)
    else:
        sparse = sparse_rows.float()
    if alpha is None or selects_every_block(lut.shape[-1], num_blocks(length, block_k)):
        return with_unused_alpha(sparse, alpha)
    total_state, total_normaliser = linear_totals(k, v)
    phi_keys = torch.softmax(keys, dim=-1) * valid[..., None]
    state = total_state[:, :, None] - phi_keys.transpose(-1, -2) @ values  # (B, H, n, D, D)
    normaliser = total_normaliser[:, :, None] - phi_keys.sum(dim=-2)  # (B, H, n, D)
    phi_q = torch.softmax(q_blocks, dim=-1)
    linear = (phi_q @ state) / ((phi_q * normaliser[..., None, :]).sum(-1, keepdim=True) + LINEAR_EPS)
    mix_blocks = alpha.float().expand(*q_rows.shape[:2], lut.shape[2]).index_select(2, sample.blocks)
    mix = from_query_blocks(mix_blocks[..., None, None].expand(-1, -1, -1, block_q, 1), sample)
    return mix * sparse + (1.0 - mix) * from_query_blocks(linear, sample)
