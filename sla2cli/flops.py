"""Attention FLOPs of dense attention and of SLA2, to tell a user what a conversion buys at their resolution.

Counted as 2 FLOPs per multiply-add, forward only, per attention call:

- dense: Q K^T and P V, 2 * L * L * D each: 4 * L^2 * D per head.
- SLA2 sparse branch: the same two products over the selected keys only, k_sel * b_k keys per row
  (at most L).
- SLA2 linear branch: phi(K)^T V over all keys (2 * L * D^2) and phi(Q) H_i for every query
  (2 * L * D^2); the normaliser phi(q) . z is lower order.
- router: pooled scores T_m x T_n x D (2 FLOPs each); the D x D projections of the pooled rows are
  lower order.

Feature maps, softmax and the block look-up table are ignored on both sides, so the ratio is the ratio of
matrix work, which is what the kernels spend their time on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sla2cli.ops.geometry import k_selected, num_blocks


def dense_attention_flops(length: int, heads: int, head_dim: int) -> int:
    """Forward FLOPs of full softmax attention for one sequence."""
    return 4 * heads * length * length * head_dim


def sla2_attention_flops(
    length: int, heads: int, head_dim: int, sparsity: float, block_q: int, block_k: int
) -> int:
    """Forward FLOPs of SLA2 (hard routing) for one sequence."""
    key_blocks = num_blocks(length, block_k)
    kept_keys = min(length, k_selected(key_blocks, sparsity) * block_k)
    sparse = 4 * length * kept_keys * head_dim
    linear = 0 if kept_keys >= length else 4 * length * head_dim * head_dim
    router = 2 * num_blocks(length, block_q) * key_blocks * head_dim
    return heads * (sparse + linear + router)


@dataclass(frozen=True)
class LayerAttention:
    """One self-attention layer of a model: its shape, and its SLA2 settings if converted."""

    heads: int
    head_dim: int
    sparsity: float | None  # None: the layer keeps dense attention
    block_q: int = 128
    block_k: int = 64


@dataclass(frozen=True)
class FlopEstimate:
    """Self-attention FLOPs of a whole model at one sequence length, before and after conversion."""

    length: int
    dense_flops: int
    converted_flops: int

    @property
    def reduction(self) -> float:
        """How many times fewer attention FLOPs the converted model spends."""
        return self.dense_flops / self.converted_flops if self.converted_flops else float("inf")


def estimate_model_flops(layers: Iterable[LayerAttention], length: int) -> FlopEstimate:
    """Sum over the model's self-attention layers; unconverted layers cost the same on both sides."""
    dense = converted = 0
    for layer in layers:
        full = dense_attention_flops(length, layer.heads, layer.head_dim)
        dense += full
        if layer.sparsity is None:
            converted += full
        else:
            converted += sla2_attention_flops(
                length, layer.heads, layer.head_dim, layer.sparsity, layer.block_q, layer.block_k
            )
    return FlopEstimate(length=length, dense_flops=dense, converted_flops=converted)
