"""Linear-branch states over each query block's complement, as one batched matrix product.

The linear branch of query block i needs H_i = sum over its NOT-selected key blocks of h_j. With
the block map M (T_m x T_n, 1 = selected), that is (1 - M) @ h for all query blocks at once: a
dense GEMM on tensor cores (T_m x T_n x D^2) instead of gathering k_sel states per query block
inside the attention kernel, which cost more than the sparse branch itself on an H100. The
backward uses the transpose: dG_j = sum over query blocks that did NOT select j of dH_i.

The key-block extent of both products is stored_state_blocks(T_n), a multiple of 8: cuBLAS keeps its
Hopper kernels for aligned extents only (sla2_kernels.numerics says what an unaligned one cost).
"""

from __future__ import annotations

import torch

from sla2_kernels.numerics import stored_state_blocks


def complement_map(lut: torch.Tensor, num_columns: int, dtype: torch.dtype) -> torch.Tensor:
    """(B*H, T_m, num_columns) map with 1 where a key block is NOT selected by the query block.

    num_columns >= T_n: the columns past T_n (no block, zero states) are 1 as well."""
    batch, heads, num_q_blocks, k_sel = lut.shape
    flat = lut.reshape(batch * heads, num_q_blocks, k_sel).long()
    unselected = torch.ones(batch * heads, num_q_blocks, num_columns, dtype=dtype, device=lut.device)
    return unselected.scatter_(2, flat, 0.0)


def complement_states(
    lut: torch.Tensor, states: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: (sum of h_j, sum of z_j) over its unselected key blocks.

    states: (B, H, T_s, D, D); norms: (B, H, T_s, D) float32, as key_block_states stores them (T_s >=
    T_n, zeros past T_n). Returns (B, H, T_m, D, D) in the states' dtype and (B, H, T_m, D) float32.
    """
    batch, heads, num_k_blocks, head_dim, _ = states.shape
    num_q_blocks = lut.shape[2]
    comp = complement_map(lut, num_k_blocks, states.dtype)
    summed = torch.bmm(comp, states.reshape(batch * heads, num_k_blocks, head_dim * head_dim))
    summed_norms = torch.bmm(comp.float(), norms.reshape(batch * heads, num_k_blocks, head_dim))
    return (
        summed.reshape(batch, heads, num_q_blocks, head_dim, head_dim),
        summed_norms.reshape(batch, heads, num_q_blocks, head_dim),
    )


def complement_state_grads(
    lut: torch.Tensor, num_k_blocks: int, grad_states: torch.Tensor, grad_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block: sums of dH_i and dz_i over the query blocks that did NOT select it.

    grad_states: (B, H, T_m, D, D); grad_norms: (B, H, T_m, D) float32. Returns (B, H, T_s, D, D) in
    grad_states' dtype and (B, H, T_s, D) float32, T_s = stored_state_blocks(T_n); the rows past T_n
    belong to no block.
    """
    batch, heads, num_q_blocks, head_dim, _ = grad_states.shape
    stored = stored_state_blocks(num_k_blocks)
    comp_t = complement_map(lut, stored, grad_states.dtype).transpose(1, 2)
    summed = torch.bmm(comp_t, grad_states.reshape(batch * heads, num_q_blocks, head_dim * head_dim))
    summed_norms = torch.bmm(comp_t.float(), grad_norms.reshape(batch * heads, num_q_blocks, head_dim))
    return (
        summed.reshape(batch, heads, stored, head_dim, head_dim),
        summed_norms.reshape(batch, heads, stored, head_dim),
    )
