"""Per-block statistics: block means for the router, and linear-branch states per key block.

One pass over K and V gives, for every key block j, h_j = phi(K_j)^T V_j (D x D) and
z_j = sum phi(K_j) (D), from which each query block's linear branch over its unselected blocks is
one batched matrix product (sla2cli.ops.complement).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sla2_kernels.common import (
    d_by_d_strides,
    dot_precision,
    feature_softmax,
    last_dim_contiguous,
    row_stride_args,
    tile_pointers,
)
from sla2_kernels.numerics import stored_state_blocks

# H200 sweep (benchmarks/results/h200_state_sweep_1898310.csv): 8 warps took 0.177 ms at 1x12x32760x128 and
# 1.31 ms at 1x40x75600x128 against 0.207 and 1.54 with 4; several blocks per program were no faster.
KEY_STATE_WARPS = 8


@triton.jit
def store_block_mean(X, Out, x_strides, batch, head, out_row, block_id, length,
                     BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Out[out_row] = mean over the real rows of block `block_id` of X[batch, head] (float32)."""
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    x = tl.load(tile_pointers(X, batch, head, rows[:, None], cols[None, :], x_strides),
                mask=rows[:, None] < length, other=0.0).to(tl.float32)
    count = tl.minimum(length - block_id * BLOCK, BLOCK).to(tl.float32)
    tl.store(Out + out_row * HEAD_DIM + cols, tl.sum(x, axis=0) / count)


@triton.jit(do_not_specialize=["length", "num_blocks"])
def _block_mean_kernel(
    X, Out,
    x_strides,
    heads, length, num_blocks,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    store_block_mean(X, Out, x_strides, bh // heads, bh % heads, bh * num_blocks + block_id, block_id, length,
                     BLOCK, HEAD_DIM)


@triton.jit(do_not_specialize=["length", "num_blocks"])
def _key_state_kernel(
    K, V, States, Norms,
    k_strides, v_strides,
    heads, length, num_blocks,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < length
    k = tl.load(tile_pointers(K, batch, head, rows[:, None], cols[None, :], k_strides),
                mask=valid, other=0.0).to(tl.float32)
    v = tl.load(tile_pointers(V, batch, head, rows[:, None], cols[None, :], v_strides),
                mask=valid, other=0.0)
    # h_j = phi(K_j)^T V_j, z_j = sum over the block's rows of phi(K_j); padded rows have phi = 0.
    phi = tl.where(valid, feature_softmax(k), 0.0)
    state = tl.dot(tl.trans(phi.to(v.dtype)), v, input_precision=DOT_PRECISION)
    block_offset = bh * num_blocks + block_id
    tl.store(tile_pointers(States, block_offset, 0, cols[:, None], cols[None, :], d_by_d_strides(HEAD_DIM)),
             state.to(States.dtype.element_ty))
    tl.store(Norms + block_offset * HEAD_DIM + cols, tl.sum(phi, axis=0))


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over the real rows of each block of a (B, H, L, D) tensor -> (B, H, T, D) float32."""
    x = last_dim_contiguous(x)
    batch, heads, length, head_dim = x.shape
    num_blocks = triton.cdiv(length, block)
    out = torch.empty(batch, heads, num_blocks, head_dim, device=x.device, dtype=torch.float32)
    _block_mean_kernel[(num_blocks, batch * heads)](
        x, out, row_stride_args(x), heads, length, num_blocks, BLOCK=block, HEAD_DIM=head_dim,
    )
    return out


def key_block_states(
    k: torch.Tensor, v: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-branch states per key block: h (B, H, T_s, D, D) in the input dtype (float32 for float32
    inputs) and z (B, H, T_s, D) float32, T_s = stored_state_blocks(T_n). Rows past the sequence end
    contribute nothing, so the blocks past T_n hold zeros."""
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, length, head_dim = k.shape
    num_blocks = stored_state_blocks(triton.cdiv(length, block))
    states = torch.empty(batch, heads, num_blocks, head_dim, head_dim, device=k.device, dtype=k.dtype)
    norms = torch.empty(batch, heads, num_blocks, head_dim, device=k.device, dtype=torch.float32)
    _key_state_kernel[(num_blocks, batch * heads)](
        k, v, states, norms, row_stride_args(k), row_stride_args(v), heads, length, num_blocks,
        BLOCK=block, HEAD_DIM=head_dim, DOT_PRECISION=dot_precision(k.dtype), num_warps=KEY_STATE_WARPS,
    )
    return states, norms
