"""Hard routing in two launches: block means of Q and K, then scores and top-k per query block.

For query block i and key block j, with qbar_i, kbar_j the block means, n_j the real tokens of key
block j and kmean = sum_j n_j kbar_j / L the sequence mean of K:
    S_ij = (qbar_i W) . (kbar_j - kmean) / sqrt(D)          W = W_q W_k^T, the router's projections
and the look-up table holds, ascending, the k_sel key blocks of largest S_ij in each row.

The route kernel takes a tile of query blocks. Its first pass walks the key blocks in chunks: it
writes the products r_ij = (qbar_i W / sqrt(D)) . (kbar_j - kbar_0) and sums n_j (kbar_j - kbar_0) on
the way, so kmean comes without another pass; the smoothing term is then one number per row. The
second pass reloads a few rows at a time, subtracts it, takes the k_sel largest scores of each row in
k_sel rounds of argmax (the lowest block among equal scores), then writes the chosen blocks in
ascending order through a prefix sum. It replaces PyTorch's pooling, score GEMM, top-k and sort (about
ten launches) where that is measured faster: see routes_in_kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sla2_kernels.block_stats import store_block_mean
from sla2_kernels.common import dot_precision, last_dim_contiguous, row_stride_args

KEYS_PER_STEP = 64  # key blocks per step of the score pass


class RouteLaunch(NamedTuple):
    """rows: query blocks per program (>= 16, tl.dot's smallest M); select_elements: rows x padded key
    blocks that the selection holds at once."""

    rows: int
    select_elements: int
    num_warps: int


# H200 sweep at 1x12x32760x128, 0.97 (benchmarks/results/h200_route_sweep.csv): 0.19-0.23 ms in every
# setting against 0.98 ms for PyTorch's routing, each timed alone; this one also ran in the whole-op bench.
ROUTE_LAUNCH = RouteLaunch(rows=16, select_elements=4096, num_warps=4)
# The selection's rounds cost k_sel x (T_n rounded up to a power of 2) per row. Measured on an H200
# (h200_bench_0.97_cf934ff.csv, h200_op_kernels_*.csv): at 32760 tokens and 0.97 (15 x 512) the kernels made
# the op's forward 1.24 ms against 1.48 ms with PyTorch's routing; at 75600 tokens (35 x 2048) the route
# kernel took 3.2 ms of GPU time where PyTorch's score GEMM, top-k and sort take 1.3 ms. Sizes in between
# are not measured and keep PyTorch's routing. A bitonic sort of each row instead of rounds was slower at
# 32760 tokens in every setting swept (0.30-0.45 ms).
MAX_SELECTION_WORK = 8192


def routes_in_kernel(k_sel: int, num_k_blocks: int) -> bool:
    """Whether the route kernel's selection is measured cheaper than PyTorch's top-k at this size."""
    return k_sel * triton.next_power_of_2(num_k_blocks) <= MAX_SELECTION_WORK


FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # a constexpr: the only kind of global a kernel may read
# The scores decide the top-k, so they keep float32 accuracy: three TF32 tensor-core products on a GPU
# instead of FMA loops (the PyTorch path's float32 GEMM took 0.24 ms at 75600 tokens on an H200).
GPU_SCORE_PRECISION = "tf32x3"


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks"])
def _pool_kernel(
    Q, K, QMean, KMean,
    q_strides, k_strides,
    heads, length, num_q_blocks, num_k_blocks,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # Programs [0, T_m) pool query blocks, [T_m, T_m + T_n) key blocks: one launch for both.
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    if block_id < num_q_blocks:
        store_block_mean(Q, QMean, q_strides, batch, head, bh * num_q_blocks + block_id, block_id, length,
                         BLOCK_Q, HEAD_DIM)
    else:
        key_block = block_id - num_q_blocks
        store_block_mean(K, KMean, k_strides, batch, head, bh * num_k_blocks + key_block, key_block, length,
                         BLOCK_K, HEAD_DIM)


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks", "k_sel"])
def _route_kernel(
    QMean, KMean, Proj, Scores, Shift, Lut,
    length, num_q_blocks, num_k_blocks, k_sel, scale,
    BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PROJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, KEYS: tl.constexpr, KEYS_PADDED: tl.constexpr, SELECT_ROWS: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # B*H*T_m*T_n can pass 2^31
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_valid = rows < num_q_blocks
    cols = tl.arange(0, HEAD_DIM)
    query = tl.load(QMean + (bh * num_q_blocks + rows[:, None]) * HEAD_DIM + cols[None, :],
                    mask=row_valid[:, None], other=0.0)
    if HAS_PROJ:
        proj = tl.load(Proj + cols[:, None] * HEAD_DIM + cols[None, :])
        query = tl.dot(query, proj, input_precision=DOT_PRECISION)
    query = query * scale
    score_rows = Scores + (bh * num_q_blocks + rows[:, None]) * num_k_blocks
    # Pass 1, in key coordinates centred on the first key block (what K's blocks share cancels here, as
    # in the smoothing itself, not between two large products): r_ij = query_i . (kbar_j - kbar_0), and
    # sum_j n_j (kbar_j - kbar_0) = L (kmean - kbar_0), so that S_ij = r_ij - query_i . (kmean - kbar_0).
    first = tl.load(KMean + bh * num_k_blocks * HEAD_DIM + cols)
    key_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, num_k_blocks, KEYS):
        keys = start + tl.arange(0, KEYS)
        key_valid = keys < num_k_blocks
        key_means = tl.load(KMean + (bh * num_k_blocks + keys[:, None]) * HEAD_DIM + cols[None, :],
                            mask=key_valid[:, None], other=0.0)
        centred = tl.where(key_valid[:, None], key_means - first[None, :], 0.0)
        tokens = tl.minimum(tl.maximum(length - keys * BLOCK_K, 0), BLOCK_K).to(tl.float32)
        key_sum += tl.sum(centred * tokens[:, None], axis=0)
        raw = tl.dot(query, tl.trans(centred), input_precision=DOT_PRECISION)
        tl.store(score_rows + keys[None, :], raw, mask=row_valid[:, None] & key_valid[None, :])
    # The smoothing term is one number per row.
    tl.store(Shift + bh * num_q_blocks + rows, tl.sum(query * key_sum[None, :], axis=1) / length, mask=row_valid)
    tl.debug_barrier()  # pass 2 reads what other threads of this program wrote
    # Pass 2, SELECT_ROWS rows at a time: final scores, then k_sel rounds of "take the largest left".
    keys = tl.arange(0, KEYS_PADDED)
    key_valid = keys < num_k_blocks
    for sub in tl.static_range(0, ROWS, SELECT_ROWS):
        sel_rows = tile * ROWS + sub + tl.arange(0, SELECT_ROWS)
        sel_valid = sel_rows < num_q_blocks
        pointers = Scores + (bh * num_q_blocks + sel_rows[:, None]) * num_k_blocks + keys[None, :]
        in_range = sel_valid[:, None] & key_valid[None, :]
        scores = tl.load(pointers, mask=in_range, other=0.0)
        scores -= tl.load(Shift + bh * num_q_blocks + sel_rows, mask=sel_valid, other=0.0)[:, None]
        tl.store(pointers, scores, mask=in_range)
        # Candidates are finite (NaN and -inf read as the lowest float), padding and taken blocks are -inf:
        # each round takes a distinct real block (the lowest among equal scores), so a row gets exactly k_sel.
        finite = tl.where(scores == scores, tl.maximum(scores, -FLOAT32_MAX), -FLOAT32_MAX)
        left = tl.where(key_valid[None, :], finite, float("-inf"))
        for _ in range(k_sel):
            best = tl.argmax(left, axis=1, tie_break_left=True)
            left = tl.where(keys[None, :] == best[:, None], float("-inf"), left)
        chosen = (left == float("-inf")) & key_valid[None, :]
        slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
        tl.store(Lut + (bh * num_q_blocks + sel_rows[:, None]) * k_sel + slot, keys[None, :] + 0 * slot,
                 mask=chosen & sel_valid[:, None])


def route_blocks(
    q: torch.Tensor, k: torch.Tensor, proj: torch.Tensor | None, block_q: int, block_k: int, k_sel: int,
    launch: RouteLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, H, T_m, T_n) float32, look-up table (B, H, T_m, k_sel) int32 ascending per row).

    proj: None or the float32 D x D product W_q W_k^T of the router's projections. 1 <= k_sel <= T_n."""
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    if not 1 <= k_sel <= num_k_blocks:
        raise ValueError(f"k_sel must be in [1, {num_k_blocks}], got {k_sel}")
    q_means = torch.empty(batch, heads, num_q_blocks, head_dim, device=q.device, dtype=torch.float32)
    k_means = torch.empty(batch, heads, num_k_blocks, head_dim, device=q.device, dtype=torch.float32)
    _pool_kernel[(num_q_blocks + num_k_blocks, batch * heads)](
        q, k, q_means, k_means, row_stride_args(q), row_stride_args(k), heads, length, num_q_blocks,
        num_k_blocks, BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=head_dim,
    )
    scores = torch.empty(batch, heads, num_q_blocks, num_k_blocks, device=q.device, dtype=torch.float32)
    shift = torch.empty(batch, heads, num_q_blocks, device=q.device, dtype=torch.float32)
    lut = torch.empty(batch, heads, num_q_blocks, k_sel, device=q.device, dtype=torch.int32)
    keys_padded = triton.next_power_of_2(num_k_blocks)
    proj_arg = proj.contiguous() if proj is not None else q_means
    launch = launch or ROUTE_LAUNCH
    _route_kernel[(triton.cdiv(num_q_blocks, launch.rows), batch * heads)](
        q_means, k_means, proj_arg, scores, shift, lut,
        length, num_q_blocks, num_k_blocks, k_sel, head_dim**-0.5,
        BLOCK_K=block_k, HEAD_DIM=head_dim, HAS_PROJ=proj is not None,
        DOT_PRECISION=GPU_SCORE_PRECISION if q.is_cuda else dot_precision(torch.float32),
        ROWS=launch.rows, KEYS=KEYS_PER_STEP, KEYS_PADDED=keys_padded,
        SELECT_ROWS=max(1, min(launch.rows, launch.select_elements // keys_padded)),
        num_warps=launch.num_warps,
    )
    return scores, lut
