"""SLA2 forward: block-sparse softmax over the selected key blocks, complement linear branch, mix.

One program per (query block, batch*head). It walks the query block's k_sel selected key blocks
once (online softmax, exp2 with the scale folded in). The linear branch arrives as the query
block's complement state (sum of phi(K_j)^T V_j over its unselected blocks, one GEMM for all query
blocks outside this kernel), so the epilogue adds one D x D product, phi(Q) H_i / (phi(Q) z_i + eps), and the alpha mix.
Measured on an H100 at (1, 12, 32760, 128), 97%: summing the selected states inside the loop instead
cost 1.21 ms against 0.67 ms; computing the linear branch before the loop (parked in the output
tile) 0.74 ms; the sparse branch alone takes 0.53 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sla2_kernels.common import LOG2E, dot_precision, feature_softmax, last_dim_contiguous, row_stride_args
from sla2_kernels.quantize import FP8_E4M3_MAX, INT8_MAX, TINY, int8_round, quantize_keys_values

# Sparse-branch precision: the input's, INT8 Q.K with fp16 P.V, or INT8 Q.K with FP8 e4m3 P.V.
QUANT_OFF, QUANT_INT8_FP16, QUANT_INT8_FP8 = 0, 1, 2

# (num_warps, num_stages) per head dim; benchmarks/gpu_suite.py sweeps these on the GPU.
FORWARD_LAUNCH: dict[int, tuple[int, int]] = {64: (4, 2), 128: (8, 3)}


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks", "k_sel", "padded_length"])
def _sla2_forward_kernel(
    Q, K, V, Lut, Alpha, CompState, CompNorm,
    KeyInt8, KeyScale, ValueFp8T, ValueScale,
    Out, Lse, OutSparse,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    heads, length, num_q_blocks, num_k_blocks, k_sel, padded_length,
    qk_scale_log2, linear_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LINEAR: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    key_offsets = tl.arange(0, BLOCK_N)
    row_valid = rows < length

    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_ql + cols[None, :],
                mask=row_valid[:, None], other=0.0)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    lut_base = Lut + (bh * num_q_blocks + q_block) * k_sel

    if QUANT != 0:  # per-token INT8 Q, made here because this program is the only reader of its Q block
        q_float = q.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q_float), axis=1), TINY) / INT8_MAX
        q_int8 = int8_round(q_float * (1.0 / q_scale)[:, None])
        q_scale = q_scale * qk_scale_log2
    key_int8_base = KeyInt8 + bh * padded_length * HEAD_DIM
    value_fp8_base = ValueFp8T + bh * HEAD_DIM * padded_length

    out_offsets = batch * stride_ob + head * stride_oh + rows[:, None] * stride_ol + cols[None, :]
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for t in range(0, k_sel):
        key_block = tl.load(lut_base + t)
        keys = key_block * BLOCK_N + key_offsets
        key_valid = keys < length
        if QUANT != 0:
            k8 = tl.load(key_int8_base + keys[None, :] * HEAD_DIM + cols[:, None], mask=key_valid[None, :], other=0)
            k_scale = tl.load(KeyScale + bh * padded_length + keys, mask=key_valid, other=0.0)
            exact = tl.dot(q_int8, k8, out_dtype=tl.int32).to(tl.float32)
            scores = exact * (q_scale[:, None] * k_scale[None, :])
        else:
            k = tl.load(k_base + keys[None, :] * stride_kl + cols[:, None], mask=key_valid[None, :], other=0.0)
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        probs = tl.math.exp2(scores - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None]
        if QUANT == 2:
            v8t = tl.load(value_fp8_base + cols[:, None] * padded_length + keys[None, :],
                          mask=key_valid[None, :], other=0.0)
            # The kernel sits 2.1-2.5e-3 from the fake-quant oracle (int8-fp16: 6-8e-4); adding a
            # fresh product per block instead of accumulating inside the MMA did not change that.
            acc += tl.dot((probs * FP8_E4M3_MAX).to(tl.float8e4nv), tl.trans(v8t))
        else:
            v = tl.load(v_base + keys[:, None] * stride_vl + cols[None, :], mask=key_valid[:, None], other=0.0)
            if QUANT == 1:
                acc = tl.dot(probs.to(tl.float16), v.to(tl.float16), acc)
            else:
                acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max

    out_sparse = acc / row_sum[:, None]
    if QUANT == 2:
        value_scale = tl.load(ValueScale + bh * HEAD_DIM + cols) / FP8_E4M3_MAX
        out_sparse = out_sparse * value_scale[None, :]
    if HAS_LINEAR:
        block_offset = bh * num_q_blocks + q_block
        state = tl.load(CompState + block_offset * HEAD_DIM * HEAD_DIM + cols[:, None] * HEAD_DIM + cols[None, :])
        norm = tl.load(CompNorm + block_offset * HEAD_DIM + cols)
        phi = feature_softmax(q.to(tl.float32))
        numerator = tl.dot(phi.to(state.dtype), state, input_precision=DOT_PRECISION)
        out_linear = numerator / (tl.sum(phi * norm[None, :], axis=1) + linear_eps)[:, None]
        mix = tl.load(Alpha + bh * num_q_blocks + q_block)
        out = mix * out_sparse + (1.0 - mix) * out_linear
    else:
        out = out_sparse
    tl.store(Out + out_offsets, out.to(Out.dtype.element_ty), mask=row_valid[:, None])
    if SAVE:
        tl.store(OutSparse + out_offsets, out_sparse.to(OutSparse.dtype.element_ty), mask=row_valid[:, None])
        tl.store(Lse + bh * length + rows, row_max + tl.math.log2(row_sum), mask=row_valid)


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
    quant: int = QUANT_OFF,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA2 forward for a block look-up table.

    q, k, v: (B, H, L, D). lut: (B, H, T_m, k_sel) int32. alpha: (B, H, T_m) float32, or None for
    the pure sparse branch (also what every-block-selected means). comp_states (B, H, T_m, D, D) and
    comp_norms (B, H, T_m, D): each query block's linear state over its unselected key blocks,
    needed when alpha is given. Returns (out, lse_log2, out_sparse); the last two are empty unless
    `save` (the backward needs them). quant: QUANT_OFF, QUANT_INT8_FP16 or QUANT_INT8_FP8 for the
    sparse branch's forward; lse and out_sparse are then those of the low-bit forward (the custom op
    saves the unquantised ones for its straight-through backward instead).
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
    num_warps, num_stages = FORWARD_LAUNCH[head_dim]
    key_int8 = key_scale = value_fp8_t = value_scale = empty
    padded_length = num_k_blocks * block_k
    if quant != QUANT_OFF:
        key_int8, key_scale, value_fp8_t, value_scale = quantize_keys_values(
            k, v, block_k, fp8_values=quant == QUANT_INT8_FP8
        )
        if quant != QUANT_INT8_FP8:
            value_fp8_t = value_scale = empty
    _sla2_forward_kernel[(num_q_blocks, batch * heads)](
        q, k, v, lut, alpha if has_linear else empty,
        comp_states if has_linear else empty, comp_norms if has_linear else empty,
        key_int8, key_scale, value_fp8_t, value_scale,
        out, lse, out_sparse,
        *row_stride_args(q), *row_stride_args(k), *row_stride_args(v), *row_stride_args(out),
        heads, length, num_q_blocks, num_k_blocks, k_sel, padded_length,
        head_dim**-0.5 * LOG2E, linear_eps,
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=head_dim,
        HAS_LINEAR=has_linear, SAVE=save, DOT_PRECISION=dot_precision(q.dtype), QUANT=quant,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse, out_sparse
