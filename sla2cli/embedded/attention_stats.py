"""How concentrated a Wan model's self-attention is: the share of softmax mass in the top key blocks.

SLA2 pays off only if, per query block, a few key blocks hold most of the probability mass. This
module measures that on real forward passes: a capturing processor on every `attn1` records the
queries and keys exactly as attention sees them (after the q/k RMS norms and RoPE), and the dense
softmax is then computed a few query blocks at a time, so the full L x L matrix never exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sla2cli.embedded.loading import noisy_latents
from sla2cli.embedded.synthetic import SyntheticClip
from sla2cli.integration.processors import wan_self_attention_qkv
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, k_selected, num_blocks

QueryKeySink = Callable[[int, torch.Tensor, torch.Tensor], None]
MAX_CHUNK_ELEMENTS = 1 << 25


class QueryKeyCaptureProcessor:
    """Dense Wan self-attention that also hands its (q, k) to a sink; the output is unchanged."""

    def __init__(self, layer_index: int, sink: QueryKeySink) -> None:
        self.layer_index = layer_index
        self.sink = sink

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("QueryKeyCaptureProcessor is for self-attention (attn1) only")
        query, key, value = (t.transpose(1, 2) for t in wan_self_attention_qkv(attn, hidden_states, rotary_emb))
        self.sink(self.layer_index, query.detach(), key.detach())
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        output = output.transpose(1, 2).flatten(2).type_as(query)
        return attn.to_out[1](attn.to_out[0](output))


@contextmanager
def capturing_query_key(model: torch.nn.Module, sink: QueryKeySink) -> Iterator[None]:
    """Within the block, every block's `attn1` reports (layer, q, k) to `sink`; processors restored after."""
    blocks = list(model.blocks)
    originals = [block.attn1.processor for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.attn1.set_processor(QueryKeyCaptureProcessor(index, sink))
        yield
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.attn1.set_processor(original)


def query_block_key_block_mass(
    q: torch.Tensor, k: torch.Tensor, query_blocks: slice, block_q: int, block_k: int
) -> torch.Tensor:
    """Softmax mass per (query block, key block) for a range of query blocks: (B, H, n, T_n).

    Each query block's row is the mean of its query rows' probability vectors summed per key block,
    so every row sums to 1; partial last blocks count only their real tokens.
    """
    length = q.shape[-2]
    key_blocks = num_blocks(length, block_k)
    first_row = query_blocks.start * block_q
    last_row = min(query_blocks.stop * block_q, length)
    logits = torch.matmul(q[..., first_row:last_row, :], k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probabilities = torch.softmax(logits, dim=-1)
    probabilities = F.pad(probabilities, (0, key_blocks * block_k - length))
    per_key_block = probabilities.unflatten(-1, (key_blocks, block_k)).sum(-1)
    count = query_blocks.stop - query_blocks.start
    per_key_block = F.pad(per_key_block, (0, 0, 0, count * block_q - (last_row - first_row)))
    summed = per_key_block.unflatten(-2, (count, block_q)).sum(-2)
    rows = torch.clamp(length - torch.arange(query_blocks.start, query_blocks.stop) * block_q, max=block_q)
    return summed / rows.to(summed).view(-1, 1)


def top_block_mass_share(
    q: torch.Tensor,
    k: torch.Tensor,
    top_fraction: float = 0.1,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per (batch, head): mean over query blocks of the softmax mass held by the top key blocks.

    The top count is floor(top_fraction * T_n), at least 1: the same rule as k_sel at sparsity
    1 - top_fraction. q, k: (B, H, L, D); computed in float32, a few query blocks at a time.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    q = q.float()
    k = k.float()
    batch, heads, length, _ = q.shape
    query_blocks = num_blocks(length, block_q)
    top_count = k_selected(num_blocks(length, block_k), 1.0 - top_fraction)
    blocks_per_chunk = max(1, max_chunk_elements // max(1, batch * heads * length * block_q))
    total = torch.zeros(batch, heads, dtype=torch.float32, device=q.device)
    for start in range(0, query_blocks, blocks_per_chunk):
        chunk = slice(start, min(start + blocks_per_chunk, query_blocks))
        mass = query_block_key_block_mass(q, k, chunk, block_q, block_k)
        total += mass.topk(top_count, dim=-1).values.sum(-1).sum(-1)
    return total / query_blocks


@dataclass(frozen=True)
class AttentionMassStats:
    """Result of `attention_block_mass_stats`: per (layer, head) top-block shares and their mean."""

    per_layer_head: torch.Tensor  # (layers, heads)
    top_fraction: float
    top_blocks: int
    key_blocks: int
    tokens: int

    @property
    def mean(self) -> float:
        """Average over layers and heads (and over the clips and timesteps measured)."""
        return float(self.per_layer_head.mean())


@torch.no_grad()
def attention_block_mass_stats(
    model: torch.nn.Module,
    clips: Sequence[SyntheticClip],
    top_fraction: float = 0.1,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    timesteps: Sequence[float] = (0.25, 0.5, 0.75),
    noise_seed: int = 0,
) -> AttentionMassStats:
    """Share of softmax mass in the top `top_fraction` key blocks per query block, per layer and head.

    Each clip is noised to each of `timesteps` (rectified flow, fixed noise from `noise_seed`) and run
    through `model` once; shares are averaged over query blocks, clips and timesteps.
    """
    if not clips:
        raise ValueError("attention_block_mass_stats needs at least one clip")
    parameter = next(model.parameters())
    totals: dict[int, torch.Tensor] = {}
    lengths: set[int] = set()

    def record(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        share = top_block_mass_share(query, key, top_fraction, block_q, block_k).mean(0).cpu()
        totals[layer] = totals.get(layer, torch.zeros_like(share)) + share
        lengths.add(query.shape[-2])

    generator = torch.Generator().manual_seed(noise_seed)
    runs = 0
    with capturing_query_key(model, record):
        for clip in clips:
            clean = clip.latents.unsqueeze(0)
            text = clip.text_embedding.unsqueeze(0).to(device=parameter.device, dtype=parameter.dtype)
            for time_value in timesteps:
                noise = torch.randn(clean.shape, generator=generator)
                t = torch.tensor([float(time_value)])
                model(
                    hidden_states=noisy_latents(clean, noise, t).to(device=parameter.device, dtype=parameter.dtype),
                    timestep=(t * 1000.0).to(parameter.device),
                    encoder_hidden_states=text,
                    return_dict=False,
                )
                runs += 1
    if len(lengths) != 1:
        raise ValueError(f"clips must share one size to be averaged together, got token counts {sorted(lengths)}")
    tokens = lengths.pop()
    per_layer_head = torch.stack([totals[layer] for layer in sorted(totals)]) / runs
    key_blocks = num_blocks(tokens, block_k)
    return AttentionMassStats(
        per_layer_head=per_layer_head,
        top_fraction=top_fraction,
        top_blocks=k_selected(key_blocks, 1.0 - top_fraction),
        key_blocks=key_blocks,
        tokens=tokens,
    )
