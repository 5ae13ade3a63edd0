"""Attention FLOPs: the one count that convert's summary, the model card, `sla2 report` and `sla2 bench` use.

Convention (as FlashAttention's papers count): matrix products only, 2 FLOPs per multiply-add, per head;
softmax, feature maps, the top-k and the look-up table are elementwise work and are not counted, so a ratio
is a ratio of the matrix work the kernels spend their time on.

- dense forward: Q K^T and P V, 2 * L * L * D each: 4 * L^2 * D.
- dense forward + backward: the backward does five such products, 2.5x the forward, so 3.5x in all.
- SLA2 sparse branch: the same two products over the (query, key) pairs of the selected blocks:
  4 * pairs * D (pairs = L * k_sel * b_k without partial blocks).
- SLA2 linear branch (when some block is left out): phi(K)^T V over all keys (2 * L * D^2) and
  phi(Q) H_i for every query (2 * L * D^2).
- router: the pooled block scores, T_m x T_n dot products of length D (2 * T_m * T_n * D); the D x D
  projections of the block means are lower order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sla2cli.ops.geometry import k_selected, num_blocks, selects_every_block

FORWARD_BACKWARD_FACTOR = 3.5  # forward (1) + backward (2.5) in units of the forward

Count = int | float | torch.Tensor  # a pair count, or a tensor of per-head pair counts (`sla2 report`)


def dense_attention_flops(length: int, head_dim: int, heads: int = 1) -> int:
    """Forward FLOPs of full softmax attention over one sequence of `length` tokens, `heads` heads."""
    return 4 * heads * length * length * head_dim


def sla2_head_flops(pairs: Count, length: int, head_dim: int, k_sel: int, block_q: int, block_k: int) -> Count:
    """Forward FLOPs of one SLA2 head whose exact branch computes `pairs` (query, key) pairs."""
    num_q_blocks, num_k_blocks = num_blocks(length, block_q), num_blocks(length, block_k)
    sparse = 4 * pairs * head_dim
    linear = 0 if selects_every_block(k_sel, num_k_blocks) else 4 * length * head_dim * head_dim
    router = 2 * num_q_blocks * num_k_blocks * head_dim
    return sparse + linear + router


def sla2_attention_flops(
    length: int, heads: int, head_dim: int, sparsity: float, block_q: int, block_k: int
) -> int:
    """Forward FLOPs of SLA2 (hard routing) for one sequence, from the block geometry alone."""
    key_blocks = num_blocks(length, block_k)
    k_sel = k_selected(key_blocks, sparsity)
    pairs = length * min(length, k_sel * block_k)
    return heads * sla2_head_flops(pairs, length, head_dim, k_sel, block_q, block_k)


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
        full = dense_attention_flops(length, layer.head_dim, layer.heads)
        dense += full
        if layer.sparsity is None:
            converted += full
        else:
            converted += sla2_attention_flops(
                length, layer.heads, layer.head_dim, layer.sparsity, layer.block_q, layer.block_k
            )
    return FlopEstimate(length=length, dense_flops=dense, converted_flops=converted)
