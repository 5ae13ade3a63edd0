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
# The sparsity levels that bench, demo and the quality suite measure when none are given.
DEFAULT_SPARSITIES = (0.90, 0.95, 0.97)


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of `block` rows covering `length` rows (the last may be partial)."""
    return (length + block - 1) // block


def k_selected(num_key_blocks: int, sparsity: float) -> int:
    """Key blocks per query-block row that go to the exact (sparse) branch.

    k_sel = max(1, floor((1 - sparsity) * T_n)). A tiny epsilon keeps e.g. (1 - 0.5) * 4 from
    rounding down to 1.999... on some platforms.
    """
    return max(1, min(num_key_blocks, math.floor((1.0 - sparsity) * num_key_blocks + 1e-9)))


def selects_every_block(k_sel: int, num_key_blocks: int) -> bool:
    """Whether every key block goes to the exact branch. Then O = O_s, which is plain softmax attention:
    the linear branch has no tokens and alpha has no effect (every path gives alpha a zero gradient)."""
    return k_sel >= num_key_blocks


# Effective and requested sparsity closer than this look the same at three decimals: not worth a note.
SPARSITY_SHOWN_TOLERANCE = 5e-4
ROUNDING_NOTE = "sparsity is applied in whole key blocks, k_sel = max(1, floor((1 - sparsity) * key blocks))"


def effective_sparsity(num_key_blocks: int, sparsity: float) -> float:
    """The sparsity that really runs: the share of key blocks per query-block row sent to the linear
    branch once k_sel is rounded to whole blocks, 1 - k_sel / T_n (at 1024 tokens 0.9 and 0.97 both
    keep 1 of 16 blocks: 0.9375)."""
    return 1.0 - k_selected(num_key_blocks, sparsity) / num_key_blocks


def sparsity_is_rounded(num_key_blocks: int, sparsity: float) -> bool:
    """Whether the effective sparsity differs visibly from the requested one."""
    return abs(effective_sparsity(num_key_blocks, sparsity) - sparsity) >= SPARSITY_SHOWN_TOLERANCE


def describe_rounding(num_key_blocks: int, sparsity: float) -> str:
    """'0.97 keeps 1 of 16 key blocks (effective_sparsity 0.938)': for the notes of bench and report."""
    kept = k_selected(num_key_blocks, sparsity)
    return (f"{sparsity:g} keeps {kept} of {num_key_blocks} key blocks "
            f"(effective_sparsity {effective_sparsity(num_key_blocks, sparsity):.3f})")
