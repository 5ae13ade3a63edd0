"""Block geometry shared by every implementation: how many blocks, how many are kept.

Kept in one place so that the reference, the Triton path and the CPU path can never disagree
on k_sel, which is the number every test and report depends on.
"""

from __future__ import annotations

import math

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
SUPPORTED_HEAD_DIMS = (64, 128)
LINEAR_EPS = 1e-6


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of `block` rows covering `length` rows (the last may be partial)."""
    return (length + block - 1) // block


def k_selected(num_key_blocks: int, sparsity: float) -> int:
    """Key blocks per query-block row that go to the exact (sparse) branch.

    k_sel = max(1, floor((1 - sparsity) * T_n)). A tiny epsilon keeps e.g. (1 - 0.5) * 4 from
    rounding down to 1.999... on some platforms.
    """
    return max(1, min(num_key_blocks, math.floor((1.0 - sparsity) * num_key_blocks + 1e-9)))
