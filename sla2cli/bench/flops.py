"""What a benchmark row is credited with: dense-equivalent FLOPs (sla2cli.flops counts them) that turn a
time into TFLOP/s, so that providers of different sparsity compare fairly, and the row's key-block budget."""

from __future__ import annotations

from typing import NamedTuple

from sla2cli.bench.cases import FORWARD, AttentionShape
from sla2cli.flops import FORWARD_BACKWARD_FACTOR, dense_attention_flops
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, effective_sparsity, k_selected, num_blocks


def shape_flops(shape: AttentionShape, mode: str) -> float:
    """FLOPs of full softmax attention at this shape (forward, or forward+backward)."""
    forward = float(dense_attention_flops(shape.length, shape.head_dim, shape.batch * shape.heads))
    return forward if mode == FORWARD else forward * FORWARD_BACKWARD_FACTOR


def selected_blocks(
    shape: AttentionShape, sparsity: float, block_k: int = DEFAULT_BLOCK_K
) -> tuple[int, int]:
    """(k_sel, T_n): key blocks kept per query block, and key blocks in all."""
    total = num_blocks(shape.length, block_k)
    return k_selected(total, sparsity), total


class BlockBudget(NamedTuple):
    """A row's key blocks: kept per query block (k_sel), in all, and the sparsity that really runs.
    All None for dense attention."""

    k_sel: int | None = None
    key_blocks: int | None = None
    effective_sparsity: float | None = None


def block_budget(shape: AttentionShape, sparsity: float | None) -> BlockBudget:
    """The key-block budget of a row at `sparsity` (the requested value rounded to whole blocks)."""
    if sparsity is None:
        return BlockBudget()
    k_sel, total = selected_blocks(shape, sparsity)
    return BlockBudget(k_sel, total, effective_sparsity(total, sparsity))


def sparse_share(shape: AttentionShape, sparsity: float | None) -> float:
    """Share of the dense FLOPs that the exact (sparse) branch computes: k_sel / T_n (1 when dense)."""
    if sparsity is None:
        return 1.0
    return 1.0 - effective_sparsity(num_blocks(shape.length, DEFAULT_BLOCK_K), sparsity)


def tflops(flops: float, milliseconds: float) -> float:
    return flops / (milliseconds * 1e-3) / 1e12
