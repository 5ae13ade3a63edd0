"""Low-bit operands of the sparse branch: INT8 queries (per token), INT8 smoothed keys (per key block),
FP8 values (per channel).

Three passes before the attention kernel, so that its loop does the least arithmetic per score:
one reduction over K (and V) for the statistics, then one pass each that writes Q and K in INT8
(and V in FP8). On an H100 the attention loop ran faster with one scale per key block than with
one per key token, and slower when it quantised Q itself instead of reading it from here
(benchmarks/results/h100_lowbit_variants*.csv).

Keys are smoothed (K minus its mean over the sequence, exact for softmax) and equalised per channel:
K is divided and Q multiplied by g_c = sqrt(max_l |K_lc - mean_c|), which leaves Q.K^T unchanged
and keeps a few wide key channels from setting the whole block's INT8 step (embedded-model
captures at 97%: worst sparse-branch error 2.32% without it, 1.98% with it; per-token key scales 1.99%).

Rounding contract (mirrored by sla2cli.ops.quantization): INT8 = round half away from zero of
x / (max|x| / 127) over a query row or a key block; FP8 e4m3 = the hardware's round-to-nearest-even
of v / (max|channel| / 448).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sla2_kernels import numerics
from sla2_kernels.common import Launch, last_dim_contiguous, row_stride_args, tile_pointers

# The values live in sla2_kernels.numerics; constexpr so that kernels may read them (host code uses `.value`).
INT8_MAX = tl.constexpr(numerics.INT8_MAX)
FP8_E4M3_MAX = tl.constexpr(numerics.FP8_E4M3_MAX)
TINY = tl.constexpr(numerics.TINY_SCALE)
# Statistics pass: rows per program, rows per load and the launch (benchmarks/lowbit_parts.py sweeps
# them); then one program per (batch, head) reduces the programs' partials. 3 stages: Triton's default.
STATS_CHUNK = 1024
STATS_BLOCK = 32
STATS_LAUNCH = Launch(num_warps=4, num_stages=3)
FINISH_STATS_LAUNCH = Launch(num_warps=8, num_stages=3)


class LowBitOperands(NamedTuple):
    """What the low-bit attention kernel reads instead of Q, K (and V). Padded rows are zero."""

    query_int8: torch.Tensor  # (B, H, L_pad_q, D) int8
    query_scale: torch.Tensor  # (B, H, L_pad_q) float32: q * gain ~ query_int8 * query_scale
    key_int8: torch.Tensor  # (B, H, L_pad_k, D) int8
    key_scale: torch.Tensor  # (B, H, T_n) float32: (k - mean) / gain ~ key_int8 * key_scale
    value_fp8_t: torch.Tensor | None  # (B, H, D, L_pad_k) float8_e4m3fn, keys contiguous
    value_scale: torch.Tensor | None  # (B, H, D) float32: v ~ value_fp8 * value_scale


@triton.jit
def int8_round(x):
    """Round half away from zero, then truncate to int8 (the cast truncates towards zero)."""
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit(do_not_specialize=["length", "num_chunks"])
def _key_value_stats_kernel(
    K, V, KeySum, KeyMax, KeyMin, ValueMax,
    k_strides, v_strides,
    heads, length, num_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, VALUES: tl.constexpr,
):
    """Per-channel partial sum, max and min of K (and max |V|) over one chunk of rows."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    cols = tl.arange(0, HEAD_DIM)
    # Element-wise accumulators, reduced across rows once at the end (not once per tile).
    total = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    largest = tl.full([BLOCK, HEAD_DIM], float("-inf"), tl.float32)
    smallest = tl.full([BLOCK, HEAD_DIM], float("inf"), tl.float32)
    value_largest = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        valid = rows[:, None] < length
        k = tl.load(tile_pointers(K, batch, head, rows[:, None], cols[None, :], k_strides),
                    mask=valid, other=0.0).to(tl.float32)
        total += k
        largest = tl.maximum(largest, tl.where(valid, k, float("-inf")))
        smallest = tl.minimum(smallest, tl.where(valid, k, float("inf")))
        if VALUES:
            v = tl.load(tile_pointers(V, batch, head, rows[:, None], cols[None, :], v_strides),
                        mask=valid, other=0.0).to(tl.float32)
            value_largest = tl.maximum(value_largest, tl.abs(v))
    total = tl.sum(total, axis=0)
    largest = tl.max(largest, axis=0)
    smallest = tl.min(smallest, axis=0)
    value_largest = tl.max(value_largest, axis=0)
    out = (bh * num_chunks + chunk) * HEAD_DIM + cols
    tl.store(KeySum + out, total)
    tl.store(KeyMax + out, largest)
    tl.store(KeyMin + out, smallest)
    if VALUES:
        tl.store(ValueMax + out, value_largest)


@triton.jit(do_not_specialize=["length", "num_chunks"])
def _finish_statistics_kernel(
    KeySum, KeyMax, KeyMin, ValueMax, KeyMean, Gain, ValueScale,
    length, num_chunks,
    STEP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUES: tl.constexpr,
):
    """Reduce the chunk partials of one (batch, head): mean, gain sqrt(max |K - mean|), value scale."""
    bh = tl.program_id(0)
    cols = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], tl.float32)
    largest = tl.full([HEAD_DIM], float("-inf"), tl.float32)
    smallest = tl.full([HEAD_DIM], float("inf"), tl.float32)
    value_largest = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(0, num_chunks, STEP):
        chunks = start + tl.arange(0, STEP)
        valid = chunks[:, None] < num_chunks
        offsets = (bh * num_chunks + chunks[:, None]) * HEAD_DIM + cols[None, :]
        total += tl.sum(tl.load(KeySum + offsets, mask=valid, other=0.0), axis=0)
        largest = tl.maximum(largest, tl.max(tl.load(KeyMax + offsets, mask=valid, other=float("-inf")), axis=0))
        smallest = tl.minimum(smallest, tl.min(tl.load(KeyMin + offsets, mask=valid, other=float("inf")), axis=0))
        if VALUES:
            value_largest = tl.maximum(value_largest, tl.max(tl.load(ValueMax + offsets, mask=valid, other=0.0),
                                                             axis=0))
    mean = total / length
    key_range = tl.maximum(largest - mean, mean - smallest)
    tl.store(KeyMean + bh * HEAD_DIM + cols, mean)
    tl.store(Gain + bh * HEAD_DIM + cols, tl.sqrt_rn(tl.maximum(key_range, TINY)))
    if VALUES:
        tl.store(ValueScale + bh * HEAD_DIM + cols, tl.maximum(value_largest, TINY) / FP8_E4M3_MAX)


@triton.jit(do_not_specialize=["length", "padded_length"])
def _quantize_queries_kernel(
    Q, Gain, QueryInt8, QueryScale,
    q_strides,
    heads, length, padded_length,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(tile_pointers(Q, batch, head, rows[:, None], cols[None, :], q_strides),
                mask=rows[:, None] < length, other=0.0).to(tl.float32)
    q = q * tl.load(Gain + bh * HEAD_DIM + cols)[None, :]
    scale = tl.maximum(tl.max(tl.abs(q), axis=1), TINY) / INT8_MAX
    tl.store(QueryInt8 + (bh.to(tl.int64) * padded_length + rows[:, None]) * HEAD_DIM + cols[None, :],
             int8_round(q * (1.0 / scale)[:, None]))
    tl.store(QueryScale + bh * padded_length + rows, scale)


@triton.jit(do_not_specialize=["length", "padded_length"])
def _quantize_keys_values_kernel(
    K, V, KeyMean, Gain, ValueScale, KeyInt8, KeyScale, ValueFp8T,
    k_strides, v_strides,
    heads, length, padded_length,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, FP8_VALUES: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < length
    k = tl.load(tile_pointers(K, batch, head, rows[:, None], cols[None, :], k_strides),
                mask=valid[:, None], other=0.0).to(tl.float32)
    mean = tl.load(KeyMean + bh * HEAD_DIM + cols)
    inverse_gain = 1.0 / tl.load(Gain + bh * HEAD_DIM + cols)
    smoothed = tl.where(valid[:, None], (k - mean[None, :]) * inverse_gain[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(smoothed), axis=1), axis=0), TINY) / INT8_MAX
    tl.store(KeyInt8 + (bh.to(tl.int64) * padded_length + rows[:, None]) * HEAD_DIM + cols[None, :],
             int8_round(smoothed * (1.0 / scale)))
    tl.store(KeyScale + bh * tl.num_programs(0) + block_id, scale)
    if FP8_VALUES:
        v = tl.load(tile_pointers(V, batch, head, rows[:, None], cols[None, :], v_strides),
                    mask=valid[:, None], other=0.0).to(tl.float32)
        inverse = 1.0 / tl.load(ValueScale + bh * HEAD_DIM + cols)
        v8 = (v * inverse[None, :]).to(tl.float8e4nv)
        # Stored transposed (D, L): the P @ V product wants keys contiguous for FP8 tensor cores.
        # Transposing the tile first makes neighbouring threads write neighbouring bytes.
        tl.store(ValueFp8T + (bh.to(tl.int64) * HEAD_DIM + cols[:, None]) * padded_length + rows[None, :],
                 tl.trans(v8))


def key_value_statistics(
    k: torch.Tensor, v: torch.Tensor, fp8_values: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over K (and V): key mean, key channel gain g = sqrt(max|K - mean|), FP8 value scales.

    Two launches (per-chunk partials, then their reduction) and no host-side arithmetic, so that
    the low-bit forward stays a short, graph-friendly sequence of kernels.
    Returns (B, H, D) float32 tensors (key_mean, gain, value_scale or None).
    """
    batch, heads, length, head_dim = k.shape
    num_chunks = triton.cdiv(length, STATS_CHUNK)
    partial = torch.empty(4, batch * heads, num_chunks, head_dim, device=k.device, dtype=torch.float32)
    _key_value_stats_kernel[(num_chunks, batch * heads)](
        k, v, partial[0], partial[1], partial[2], partial[3],
        row_stride_args(k), row_stride_args(v), heads, length, num_chunks,
        CHUNK=STATS_CHUNK, BLOCK=STATS_BLOCK, HEAD_DIM=head_dim, VALUES=fp8_values,
        num_warps=STATS_LAUNCH.num_warps, num_stages=STATS_LAUNCH.num_stages,
    )
    stats = torch.empty(3, batch, heads, head_dim, device=k.device, dtype=torch.float32)
    _finish_statistics_kernel[(batch * heads,)](
        partial[0], partial[1], partial[2], partial[3], stats[0], stats[1], stats[2],
        length, num_chunks, STEP=min(32, triton.next_power_of_2(num_chunks)), HEAD_DIM=head_dim,
        VALUES=fp8_values, num_warps=FINISH_STATS_LAUNCH.num_warps, num_stages=FINISH_STATS_LAUNCH.num_stages,
    )
    return stats[0], stats[1], stats[2] if fp8_values else None


def quantize_operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int, fp8_values: bool
) -> LowBitOperands:
    """INT8 queries and smoothed, equalised keys (and FP8 values) for the low-bit attention kernel."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, length, head_dim = k.shape
    key_mean, gain, value_scale = key_value_statistics(k, v, fp8_values)
    num_q_blocks, num_k_blocks = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    padded_q, padded_k = num_q_blocks * block_q, num_k_blocks * block_k
    device = k.device
    query_int8 = torch.empty(batch, heads, padded_q, head_dim, device=device, dtype=torch.int8)
    query_scale = torch.empty(batch, heads, padded_q, device=device, dtype=torch.float32)
    key_int8 = torch.empty(batch, heads, padded_k, head_dim, device=device, dtype=torch.int8)
    key_scale = torch.empty(batch, heads, num_k_blocks, device=device, dtype=torch.float32)
    value_fp8_t = None
    if fp8_values:
        value_fp8_t = torch.empty(batch, heads, head_dim, padded_k, device=device, dtype=torch.float8_e4m3fn)
    empty = k.new_empty(0, dtype=torch.float32)
    _quantize_queries_kernel[(num_q_blocks, batch * heads)](
        q, gain, query_int8, query_scale, row_stride_args(q), heads, length, padded_q,
        BLOCK=block_q, HEAD_DIM=head_dim,
    )
    _quantize_keys_values_kernel[(num_k_blocks, batch * heads)](
        k, v, key_mean, gain, value_scale if fp8_values else empty, key_int8, key_scale,
        value_fp8_t if fp8_values else empty,
        row_stride_args(k), row_stride_args(v), heads, length, padded_k,
        BLOCK=block_k, HEAD_DIM=head_dim, FP8_VALUES=fp8_values,
    )
    return LowBitOperands(query_int8, query_scale, key_int8, key_scale, value_fp8_t, value_scale)
