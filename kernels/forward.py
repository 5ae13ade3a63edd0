"""SLA2 forward: block-sparse softmax over the selected key blocks, complement linear branch, mix.

For query block i, with S_i its selected key blocks (its row of the look-up table) and alpha_i its mix:
    O_s = softmax(Q K_S^T / sqrt(D)) V_S                    the sparse branch, over S_i only
    O_l = phi(Q) H_i / (phi(Q) z_i + eps)                   the linear branch, phi = softmax over features
    O   = alpha_i O_s + (1 - alpha_i) O_l
where H_i = sum of phi(K_j)^T V_j and z_i = sum of phi(K_j) over the key blocks j NOT in S_i: the
query block's complement state, one GEMM for all query blocks outside this kernel
(sla2cli.ops.complement).

One program per (query block, batch*head). The loop walks S_i once, one `_block_scores`,
`_online_softmax_step`, `_accumulate_values` per key block (exp2, with the softmax scale folded
in); `_linear_epilogue` then adds the linear branch as one D x D product and the alpha mix.
Summing the selected states inside the loop instead, or computing the linear branch before it,
measured slower on an H100; on an H200, so did loading the linear state before the loop, mixing in a
second kernel, and two key blocks per step as one wider tile. Key and value blocks are gathered
through tensor descriptors (TMA, `block_rows`) where the launch table says so and the launch is large
enough to hide the host cost of building them (MIN_DESCRIPTOR_PAIRS), through pointers otherwise.

Low-bit modes (sla2_kernels.modes) read Q and K pre-quantised to INT8 (sla2_kernels.quantize):
one scale per query row and one per key block, so a score row needs one scale, folded into the
FMA that subtracts the running max. P.V stays in the input's type (int8) or goes through FP8 e4m3
(int8-fp8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sla2_kernels import modes
from sla2_kernels.common import (
    LOG2E,
    Launch,
    block_rows,
    block_sources,
    d_by_d_strides,
    dot_precision,
    feature_softmax,
    last_dim_contiguous,
    row_stride_args,
    tile_pointers,
)
from sla2_kernels.quantize import FP8_E4M3_MAX, quantize_operands

# The kernel's QUANT codes (the table is sla2_kernels.modes), under the names callers import.
CODE_OFF = modes.kernel_code(modes.QUANT_NONE)
CODE_INT8 = modes.kernel_code(modes.QUANT_INT8)
CODE_INT8_FP8 = modes.kernel_code(modes.QUANT_INT8_FP8)
# The same codes as compile-time constants: the only kind of global a kernel may read.
_OFF = tl.constexpr(CODE_OFF)
_INT8_FP8 = tl.constexpr(CODE_INT8_FP8)

# Per (head dim, QUANT code), from the H100 sweeps of benchmarks/gpu_suite.py and lowbit_parts.py
# (benchmarks/results/h100_lowbit_parts*.csv). int8-fp8 at D = 128 needs 8 warps. Tensor descriptors at
# D = 128 from an H200 (h200_tma_sweep_6be644f.csv): 0.670 against 0.685 ms at 1x12x32760x128 and 9.59 against
# 9.88 ms at 1x40x75600x128, 0.97; D = 64 was not measured with them.
FORWARD_LAUNCH: dict[tuple[int, int], Launch] = {
    (64, CODE_OFF): Launch(4, 2, False), (128, CODE_OFF): Launch(8, 3, False, tma=True),
    (64, CODE_INT8): Launch(8, 3, True), (128, CODE_INT8): Launch(4, 2, True),
    (64, CODE_INT8_FP8): Launch(4, 2, True), (128, CODE_INT8_FP8): Launch(8, 3, False),
}
# Tensor descriptors are built on the host at every launch. Where the op is launch-bound that host time shows:
# the whole forward at 1x12x32760x128 (12 x 256 x 15 = 46K block pairs) took 1.42 ms with them against 1.22
# without (h200_bench_0.97_c717352.csv, h200_bench_0.97_be95277.csv), while at 1x40x75600x128 (827K pairs) it
# gained (14.2 against 14.7 ms). So they are used from this many (query block, key block) pairs per launch
# (1.215 ms at 1x12x32760x128 with this gate, h200_bench_0.97_32760_0126fc2.csv).
MIN_DESCRIPTOR_PAIRS = 1 << 18


@triton.jit
def _block_scores(
    q, row_scale, key_block, keys, key_valid, cols, batch, head, K, k_strides, key_int8_head, key_scale_head,
    length, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
    TMA: tl.constexpr,
):
    """S = Q K^T for one key block, unscaled, and the per-row factor that scales it to log2 units.

    Low-bit: an INT8 x INT8 product (exact in int32); its scale is the query row's times the key
    block's, so one factor per row still covers the tile.
    """
    if QUANT != _OFF:
        k8 = tl.load(key_int8_head + keys[None, :] * HEAD_DIM + cols[:, None])
        raw = tl.dot(q, k8, out_dtype=tl.int32).to(tl.float32)
        step_scale = row_scale * tl.load(key_scale_head + key_block)
    else:
        if TMA:
            k = tl.trans(block_rows(K, batch, head, key_block * BLOCK_N, k_strides, length, BLOCK_N, HEAD_DIM, TMA))
        else:  # the (D, BLOCK_N) tile directly
            k = tl.load(tile_pointers(K, batch, head, keys[None, :], cols[:, None], k_strides),
                        mask=key_valid[None, :], other=0.0)
        raw = tl.dot(q, k, input_precision=DOT_PRECISION)
        step_scale = row_scale
    return raw, step_scale


@triton.jit
def _online_softmax_step(raw, step_scale, key_valid, row_max, row_sum, acc):
    """Online softmax over one more key block: m' = max(m, max_j s_j), P = 2^(s - m'), l' = l 2^(m - m') + sum_j P.

    s = raw * step_scale. Returns (P, m', l', acc 2^(m - m')): the accumulator rescaled to the new max.
    Scales are positive, so the row max of the unscaled scores gives the scaled one, and the scale
    and the subtraction are one FMA per score.
    """
    raw = tl.where(key_valid[None, :], raw, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(raw, axis=1) * step_scale)
    probs = tl.math.exp2(raw * step_scale[:, None] - new_max[:, None])
    rescale = tl.math.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None]
    return probs, new_max, row_sum, acc


@triton.jit
def _accumulate_values(
    acc, probs, key_block, keys, cols, batch, head, V, v_strides, value_fp8_head, padded_k, length,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
    TMA: tl.constexpr,
):
    """acc += P V for one key block."""
    if QUANT == _INT8_FP8:
        v8t = tl.load(value_fp8_head + cols[:, None] * padded_k + keys[None, :])
        # P times 448: the row max (P = 1) lands on e4m3's largest value, small P stay normal.
        # A fresh product per block, added in float32: Hopper's FP8 MMA is reported to accumulate with
        # fewer bits than float32.
        acc += tl.dot((probs * FP8_E4M3_MAX).to(tl.float8e4nv), tl.trans(v8t))
    else:
        v = block_rows(V, batch, head, key_block * BLOCK_N, v_strides, length, BLOCK_N, HEAD_DIM, TMA)
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_epilogue(
    out_sparse, q, Alpha, CompState, CompNorm, bh, q_block, num_q_blocks, cols, linear_eps,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, ACCUMULATE_LINEAR: tl.constexpr,
):
    """O = alpha O_s + (1 - alpha) phi(Q) H / (phi(Q) z + eps), with the query block's H, z, alpha."""
    block_offset = bh * num_q_blocks + q_block
    state = tl.load(tile_pointers(CompState, block_offset, 0, cols[:, None], cols[None, :], d_by_d_strides(HEAD_DIM)))
    norm = tl.load(CompNorm + block_offset * HEAD_DIM + cols)
    phi = feature_softmax(q.to(tl.float32))
    mix = tl.load(Alpha + block_offset)
    denominator = tl.sum(phi * norm[None, :], axis=1) + linear_eps
    if ACCUMULATE_LINEAR:
        # The same sum with phi @ state accumulated onto the sparse tile scaled by mix / w, then
        # times w = (1 - mix) / denominator: one D-wide tile fewer live, which is what 4 warps need.
        linear_weight = tl.maximum((1.0 - mix) / denominator, 1e-30)
        out = tl.dot(phi.to(state.dtype), state, out_sparse * (mix / linear_weight)[:, None],
                     input_precision=DOT_PRECISION)
        out = out * linear_weight[:, None]
    else:
        numerator = tl.dot(phi.to(state.dtype), state, input_precision=DOT_PRECISION)
        out = mix * out_sparse + (1.0 - mix) * (numerator / denominator[:, None])
    return out


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks", "k_sel", "padded_q", "padded_k"])
def _sla2_forward_kernel(
    Q, K, V, Lut, Alpha, CompState, CompNorm,
    QueryInt8, QueryScale, KeyInt8, KeyScale, ValueFp8T, ValueScale,
    Out, Lse, OutSparse,
    q_strides, k_strides, v_strides, out_strides,
    heads, length, num_q_blocks, num_k_blocks, k_sel, padded_q, padded_k,
    qk_scale_log2, linear_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LINEAR: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
    ACCUMULATE_LINEAR: tl.constexpr, TMA: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    key_offsets = tl.arange(0, BLOCK_N)
    row_valid = rows < length

    if QUANT != _OFF:
        # INT8 Q, pre-quantised per token. 64-bit offsets into the low-bit operands:
        # (B * H * L_pad * D) passes 2^31 at a few long videos per batch.
        q = tl.load(QueryInt8 + (bh.to(tl.int64) * padded_q + rows[:, None]) * HEAD_DIM + cols[None, :])
        row_scale = tl.load(QueryScale + bh * padded_q + rows) * qk_scale_log2
    else:
        q = tl.load(tile_pointers(Q, batch, head, rows[:, None], cols[None, :], q_strides),
                    mask=row_valid[:, None], other=0.0)
        row_scale = tl.full([BLOCK_M], 1.0, tl.float32) * qk_scale_log2
    lut_row = Lut + (bh * num_q_blocks + q_block) * k_sel
    key_int8_head = KeyInt8 + bh.to(tl.int64) * padded_k * HEAD_DIM
    key_scale_head = KeyScale + bh * num_k_blocks
    value_fp8_head = ValueFp8T + bh.to(tl.int64) * HEAD_DIM * padded_k

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, k_sel):
        key_block = tl.load(lut_row + t)
        keys = key_block * BLOCK_N + key_offsets
        key_valid = keys < length
        raw, step_scale = _block_scores(q, row_scale, key_block, keys, key_valid, cols, batch, head, K, k_strides,
                                        key_int8_head, key_scale_head, length, BLOCK_N, HEAD_DIM, DOT_PRECISION,
                                        QUANT, TMA)
        probs, new_max, row_sum, acc = _online_softmax_step(raw, step_scale, key_valid, row_max, row_sum, acc)
        acc = _accumulate_values(acc, probs, key_block, keys, cols, batch, head, V, v_strides, value_fp8_head,
                                 padded_k, length, BLOCK_N, HEAD_DIM, DOT_PRECISION, QUANT, TMA)
        row_max = new_max

    out_sparse = acc / row_sum[:, None]
    if QUANT == _INT8_FP8:
        value_scale = tl.load(ValueScale + bh * HEAD_DIM + cols) / FP8_E4M3_MAX
        out_sparse = out_sparse * value_scale[None, :]
    out_tile = tile_pointers(Out, batch, head, rows[:, None], cols[None, :], out_strides)
    if SAVE:
        # For the backward: O_s (OutSparse has Out's strides) and the row log-sum-exp in log2 units.
        tl.store(tile_pointers(OutSparse, batch, head, rows[:, None], cols[None, :], out_strides),
                 out_sparse.to(OutSparse.dtype.element_ty), mask=row_valid[:, None])
        tl.store(Lse + bh * length + rows, row_max + tl.math.log2(row_sum), mask=row_valid)
    if HAS_LINEAR:
        if QUANT != _OFF:
            q = tl.load(tile_pointers(Q, batch, head, rows[:, None], cols[None, :], q_strides),
                        mask=row_valid[:, None], other=0.0)
        out = _linear_epilogue(out_sparse, q, Alpha, CompState, CompNorm, bh, q_block, num_q_blocks, cols,
                               linear_eps, HEAD_DIM, DOT_PRECISION, ACCUMULATE_LINEAR)
    else:
        out = out_sparse
    tl.store(out_tile, out.to(Out.dtype.element_ty), mask=row_valid[:, None])


def sla2_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    comp_states: torch.Tensor | None,
    comp_norms: torch.Tensor | None,
    block_q: int,
    block_k: int,
    save: bool,
    linear_eps: float,
    quant: int = CODE_OFF,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA2 forward for a block look-up table.

    q, k, v: (B, H, L, D). lut: (B, H, T_m, k_sel) int32. alpha: (B, H, T_m) float32, or None for
    the pure sparse branch (also what every-block-selected means). comp_states (B, H, T_m, D, D) and
    comp_norms (B, H, T_m, D): each query block's linear state over its unselected key blocks,
    needed when alpha is given. Returns (out, lse_log2, out_sparse); the last two are empty unless
    `save` (the backward needs them). quant: the kernel code of a mode (sla2_kernels.modes.kernel_code)
    for the sparse branch's forward; lse and out_sparse are then those of the low-bit forward (the
    custom op saves the unquantised ones for its straight-through backward instead).
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    k_sel = lut.shape[-1]
    has_linear = alpha is not None
    out = torch.empty_like(q)
    empty = q.new_empty(0, dtype=torch.float32)
    lse = q.new_empty(batch, heads, length, dtype=torch.float32) if save else empty
    out_sparse = torch.empty_like(q) if save else q.new_empty(0)
    launch = FORWARD_LAUNCH[head_dim, quant]
    low_bit = [empty] * 6
    padded_q, padded_k = num_q_blocks * block_q, num_k_blocks * block_k
    if quant != CODE_OFF:
        operands = quantize_operands(q, k, v, block_q, block_k, fp8_values=quant == CODE_INT8_FP8)
        low_bit = [empty if x is None else x for x in operands]
    # Low-bit modes read K (and, for int8-fp8, V) from their own quantised copies: no descriptors there.
    pairs = batch * heads * num_q_blocks * k_sel
    (k_rows, v_rows), tma = block_sources((k, v), block_k,
                                          launch.tma and quant == CODE_OFF and pairs >= MIN_DESCRIPTOR_PAIRS)
    _sla2_forward_kernel[(num_q_blocks, batch * heads)](
        q, k_rows, v_rows, lut, alpha if has_linear else empty,
        comp_states if has_linear else empty, comp_norms if has_linear else empty,
        *low_bit,
        out, lse, out_sparse,
        row_stride_args(q), row_stride_args(k), row_stride_args(v), row_stride_args(out),
        heads, length, num_q_blocks, num_k_blocks, k_sel, padded_q, padded_k,
        head_dim**-0.5 * LOG2E, linear_eps,
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=head_dim,
        HAS_LINEAR=has_linear, SAVE=save, DOT_PRECISION=dot_precision(q.dtype), QUANT=quant,
        ACCUMULATE_LINEAR=launch.accumulate_linear, TMA=tma, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out, lse, out_sparse
