"""Hard routing in three launches: block means of Q and K, scores, then top-k per query block.

For query block i and key block j, with qbar_i, kbar_j the block means, n_j the real tokens of key
block j and kmean = sum_j n_j kbar_j / L the sequence mean of K:
    S_ij = (qbar_i W) . (kbar_j - kmean) / sqrt(D)          W = W_q W_k^T, the router's projections
and the look-up table holds, ascending, the k_sel key blocks of largest S_ij in each row.

The score kernel takes a tile of query blocks and walks the key blocks in chunks: it writes the
products r_ij = (qbar_i W / sqrt(D)) . (kbar_j - kbar_0) and sums n_j (kbar_j - kbar_0) on the way, so
kmean comes without another pass; the smoothing term is then one number per row. The select kernel
reads whole rows, subtracts that number, and finds each row's k_sel-th largest score by a binary
search over its bits (32 rounds of "how many are at least this", whatever k_sel is), then writes the
chosen blocks in ascending order through a prefix sum. select_top_blocks runs the same selection on
scores computed elsewhere.
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
    """rows: query blocks per score program (>= 16, tl.dot's smallest M); num_warps: its warps.
    select_elements: rows x padded key blocks one select program holds; select_warps: its warps."""

    rows: int
    num_warps: int
    select_elements: int
    select_warps: int


# H200 sweep at 0.97 (benchmarks/results/h200_route_sweep_ab51273.csv; pool, score and select kernels timed
# together): 0.130 ms at 1x12x32760x128 and 1.46 ms at 1x40x75600x128. At 75600 tokens the routing they replace
# (block-mean kernels, float32 GEMMs, top-k, sort) took about 1.9 ms of GPU time (h200_op_kernels_18ea742.csv).
# 64 score rows: 1.32 ms at 75600 tokens but 0.135 at 32760 (h200_route_sweep_13b3df6.csv); not whole-op measured.
ROUTE_LAUNCH = RouteLaunch(rows=32, num_warps=4, select_elements=2048, select_warps=2)
# The selection holds whole rows of scores in registers, T_n rounded up to a power of 2; its cost does not
# depend on k_sel (32 rounds per row). Longer rows keep PyTorch's top-k.
MAX_KERNEL_KEY_BLOCKS = 4096


def routes_in_kernel(num_k_blocks: int) -> bool:
    """Whether the routing kernels take rows of this many key blocks (else PyTorch routes)."""
    return triton.next_power_of_2(num_k_blocks) <= MAX_KERNEL_KEY_BLOCKS


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


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks"])
def _score_kernel(
    QMean, KMean, Proj, Scores, Shift,
    length, num_q_blocks, num_k_blocks, scale,
    BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PROJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, KEYS: tl.constexpr,
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
    # In key coordinates centred on the first key block (what K's blocks share cancels here, as in the
    # smoothing itself, not between two large products): r_ij = query_i . (kbar_j - kbar_0), and
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
    # The smoothing term is one number per row; the select kernel subtracts it.
    tl.store(Shift + bh * num_q_blocks + rows, tl.sum(query * key_sum[None, :], axis=1) / length, mask=row_valid)


@triton.jit
def _order_keys(scores):
    """uint32 keys in the order of the float32 scores, ties kept: NaN and -inf read as the lowest float,
    -0.0 as 0.0. A float's bits order like integers for positive floats and in reverse for negative ones, so
    the sign bit is set on positive ones and every bit flipped on negative ones. The lowest float maps to
    0x00800000: every real block's key is above 0, which marks padding."""
    finite = tl.where(scores == scores, tl.maximum(scores, -FLOAT32_MAX), -FLOAT32_MAX)
    finite = tl.where(finite == 0.0, 0.0, finite)
    bits = finite.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit(do_not_specialize=["num_rows", "num_k_blocks", "k_sel"])
def _select_kernel(
    Scores, Shift, Lut,
    num_rows, num_k_blocks, k_sel,
    HAS_SHIFT: tl.constexpr, ROWS: tl.constexpr, KEYS_PADDED: tl.constexpr,
):
    # Rows are the flattened (batch, head, query block) rows of the (.., T_n) score map.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < num_rows
    keys = tl.arange(0, KEYS_PADDED)
    key_valid = keys < num_k_blocks
    in_range = row_valid[:, None] & key_valid[None, :]
    pointers = Scores + rows[:, None] * num_k_blocks + keys[None, :]
    scores = tl.load(pointers, mask=in_range, other=0.0)
    if HAS_SHIFT:
        scores -= tl.load(Shift + rows, mask=row_valid, other=0.0)[:, None]
        tl.store(pointers, scores, mask=in_range)
    order = tl.where(key_valid[None, :], _order_keys(scores), 0)
    # The k_sel-th largest key t of a row is the largest value with count(order >= t) >= k_sel: decided
    # bit by bit from the top, each round keeping a bit when the row still has k_sel keys at or above it.
    kth = tl.zeros([ROWS], dtype=tl.uint32)
    for shift in range(32):
        candidate = kth | (tl.full([ROWS], 0x80000000, tl.uint32) >> shift)
        at_least = tl.sum((order >= candidate[:, None]).to(tl.int32), axis=1)
        kth = tl.where(at_least >= k_sel, candidate, kth)
    # Everything above t is taken (fewer than k_sel keys); of the keys equal to t, the lowest blocks fill the
    # rest, so a row gets exactly k_sel distinct blocks whatever ties it holds.
    above = order > kth[:, None]
    tied = order == kth[:, None]
    room = k_sel - tl.sum(above.to(tl.int32), axis=1)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(Lut + rows[:, None] * k_sel + slot, keys[None, :] + 0 * slot, mask=chosen & row_valid[:, None])


def _check_budget(k_sel: int, num_k_blocks: int) -> None:
    if not 1 <= k_sel <= num_k_blocks:
        raise ValueError(f"k_sel must be in [1, {num_k_blocks}], got {k_sel}")


def _launch_select(
    scores: torch.Tensor, shift: torch.Tensor | None, k_sel: int, launch: RouteLaunch
) -> torch.Tensor:
    """Look-up table (.., k_sel) int32 of the k_sel largest scores per row of a contiguous float32 map
    (minus shift per row, written back, when given)."""
    num_k_blocks = scores.shape[-1]
    _check_budget(k_sel, num_k_blocks)
    lut = torch.empty(*scores.shape[:-1], k_sel, device=scores.device, dtype=torch.int32)
    num_rows = scores.numel() // num_k_blocks
    keys_padded = triton.next_power_of_2(num_k_blocks)
    rows = max(1, launch.select_elements // keys_padded)
    _select_kernel[(triton.cdiv(num_rows, rows),)](
        scores, shift if shift is not None else scores, lut, num_rows, num_k_blocks, k_sel,
        HAS_SHIFT=shift is not None, ROWS=rows, KEYS_PADDED=keys_padded, num_warps=launch.select_warps,
    )
    return lut


def select_top_blocks(scores: torch.Tensor, k_sel: int, launch: RouteLaunch | None = None) -> torch.Tensor:
    """(.., T_m, k_sel) int32 look-up table, ascending per row: the k_sel key blocks of largest score, the
    lowest block first among equal scores, NaN and -inf last. scores: (.., T_m, T_n) float32."""
    return _launch_select(scores.float().contiguous(), None, k_sel, launch or ROUTE_LAUNCH)


def route_blocks(
    q: torch.Tensor, k: torch.Tensor, proj: torch.Tensor | None, block_q: int, block_k: int, k_sel: int,
    launch: RouteLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, H, T_m, T_n) float32, look-up table (B, H, T_m, k_sel) int32 ascending per row).

    proj: None or the float32 D x D product W_q W_k^T of the router's projections. 1 <= k_sel <= T_n."""
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    _check_budget(k_sel, num_k_blocks)  # before any launch
    q_means = torch.empty(batch, heads, num_q_blocks, head_dim, device=q.device, dtype=torch.float32)
    k_means = torch.empty(batch, heads, num_k_blocks, head_dim, device=q.device, dtype=torch.float32)
    _pool_kernel[(num_q_blocks + num_k_blocks, batch * heads)](
        q, k, q_means, k_means, row_stride_args(q), row_stride_args(k), heads, length, num_q_blocks,
        num_k_blocks, BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=head_dim,
    )
    scores = torch.empty(batch, heads, num_q_blocks, num_k_blocks, device=q.device, dtype=torch.float32)
    shift = torch.empty(batch, heads, num_q_blocks, device=q.device, dtype=torch.float32)
    proj_arg = proj.contiguous() if proj is not None else q_means
    launch = launch or ROUTE_LAUNCH
    _score_kernel[(triton.cdiv(num_q_blocks, launch.rows), batch * heads)](
        q_means, k_means, proj_arg, scores, shift,
        length, num_q_blocks, num_k_blocks, head_dim**-0.5,
        BLOCK_K=block_k, HEAD_DIM=head_dim, HAS_PROJ=proj is not None,
        DOT_PRECISION=GPU_SCORE_PRECISION if q.is_cuda else dot_precision(torch.float32),
        ROWS=launch.rows, KEYS=KEYS_PER_STEP, num_warps=launch.num_warps,
    )
    return scores, _launch_select(scores, shift, k_sel, launch)
