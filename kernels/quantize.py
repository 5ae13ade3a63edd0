"""Low-bit operands of the sparse branch: INT8 smoothed keys (per-token scale) and FP8 values.

One pass over K (and V for FP8) per key block, before the attention kernel: every key block is read
by many query blocks there, so quantising it once halves the bytes of each of those reads. Q is
quantised inside the attention kernel, which loads each query block exactly once.

Rounding contract (mirrored by sla2cli.ops.quantization): INT8 = round half away from zero of
x / (max|row| / 127); FP8 e4m3 = the hardware's round-to-nearest-even of v / (max|channel| / 448).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sla2_kernels.common import last_dim_contiguous, row_stride_args

# constexpr so that kernels may read them; host code uses `.value`.
INT8_MAX = tl.constexpr(127.0)
FP8_E4M3_MAX = tl.constexpr(448.0)
TINY = tl.constexpr(1e-30)


@triton.jit
def int8_round(x):
    """Round half away from zero, then truncate to int8 (the cast truncates towards zero)."""
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit(do_not_specialize=["length", "padded_length"])
def _quantize_keys_values_kernel(
    K, V, KeyMean, ValueScale, KeyInt8, KeyScale, ValueFp8T,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    heads, length, padded_length,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, FP8_VALUES: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < length
    k = tl.load(K + batch * stride_kb + head * stride_kh + rows[:, None] * stride_kl + cols[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    mean = tl.load(KeyMean + bh * HEAD_DIM + cols)
    smoothed = tl.where(valid[:, None], k - mean[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.abs(smoothed), axis=1), TINY) / INT8_MAX
    quantized = int8_round(smoothed * (1.0 / scale)[:, None])
    tl.store(KeyInt8 + (bh * padded_length + rows[:, None]) * HEAD_DIM + cols[None, :], quantized)
    tl.store(KeyScale + bh * padded_length + rows, scale)
    if FP8_VALUES:
        v = tl.load(V + batch * stride_vb + head * stride_vh + rows[:, None] * stride_vl + cols[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        inverse = 1.0 / tl.load(ValueScale + bh * HEAD_DIM + cols)
        v8 = (v * inverse[None, :]).to(tl.float8e4nv)
        # Stored transposed (D, L): the P @ V product wants keys contiguous for FP8 tensor cores.
        # Transposing the tile first makes neighbouring threads write neighbouring bytes.
        tl.store(ValueFp8T + (bh * HEAD_DIM + cols[:, None]) * padded_length + rows[None, :], tl.trans(v8))


def value_channel_scales(v: torch.Tensor) -> torch.Tensor:
    """(B, H, D) float32: max |v| per channel over the sequence, over 448."""
    largest = torch.linalg.vector_norm(v, ord=float("inf"), dim=2).float()
    return largest.clamp_min(TINY.value) / FP8_E4M3_MAX.value


def quantize_keys_values(
    k: torch.Tensor, v: torch.Tensor, block: int, fp8_values: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """INT8 smoothed keys and (optionally) FP8 values for the low-bit attention kernel.

    Returns key_int8 (B, H, L_pad, D), key_scale (B, H, L_pad) float32, and for FP8 values
    value_fp8_t (B, H, D, L_pad) with value_scale (B, H, D) float32 (dequantised v = v8 * scale).
    L_pad rounds L up to whole blocks; padded rows are zero.
    """
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    batch, heads, length, head_dim = k.shape
    num_blocks = triton.cdiv(length, block)
    padded_length = num_blocks * block
    key_mean = k.mean(dim=2, dtype=torch.float32).contiguous()
    key_int8 = torch.empty(batch, heads, padded_length, head_dim, device=k.device, dtype=torch.int8)
    key_scale = torch.empty(batch, heads, padded_length, device=k.device, dtype=torch.float32)
    if fp8_values:
        value_scale = value_channel_scales(v).contiguous()
        value_fp8_t = torch.empty(batch, heads, head_dim, padded_length, device=k.device, dtype=torch.float8_e4m3fn)
    else:
        value_scale = value_fp8_t = None
    empty = k.new_empty(0, dtype=torch.float32)
    _quantize_keys_values_kernel[(num_blocks, batch * heads)](
        k, v, key_mean, value_scale if fp8_values else empty, key_int8, key_scale,
        value_fp8_t if fp8_values else empty,
        *row_stride_args(k), *row_stride_args(v), heads, length, padded_length,
        BLOCK=block, HEAD_DIM=head_dim, FP8_VALUES=fp8_values,
    )
    return key_int8, key_scale, value_fp8_t, value_scale
