"""Low-bit sparse branch: which modes exist, which device runs which, and the fake-quant oracle.

Modes (docs/method.md, section 6): the exact (sparse) branch's Q.K^T in INT8, the forward only. Q is
INT8 per token; K is smoothed (minus its mean over the sequence: exact for softmax, because it
shifts every logit of a row by the same amount), equalised per channel (K divided and Q multiplied
by g = sqrt(max |K - mean|) per channel: Q.K^T is unchanged) and INT8 with one scale per key
block, so that the kernel applies one scale per score row (its attention loop ran faster that way than
with per-token key scales or in bf16; the timings are in benchmarks/results/).
Then P.V is either
- `int8`: in the input's precision, as the unquantised kernel does it; or
- `int8-fp8`: FP8 e4m3 (V scaled per channel, P by FP8_E4M3_MAX so that 1 maps to the format's top),
  which needs FP8 tensor cores (compute capability 8.9+). It measured no faster than `int8` and, with
  3 mantissa bits, about 3.7% off the bf16 output on random inputs, so `auto` never picks it.

`auto` is resolved per call from recorded measurements (ops.lowbit_speed): `int8` only on a GPU, head
dim, shape class and pass (forward or training) where it was measured faster than bf16; bf16 elsewhere,
unknown GPUs and CPUs included (choose_auto_quant says why in one line).
The router and the linear branch keep the input precision. The backward is the unquantised one
(straight-through): fine-tuning through the low-bit forward is quantisation-aware training.

`sla2_lowbit_reference` reproduces the kernel's rounding step by step, including the online
softmax's running maximum over the selected key blocks in look-up-table order, because P is
rounded after the subtraction of that running maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from sla2_kernels.modes import QUANT_INT8, QUANT_INT8_FP8, QUANT_MODES, QUANT_NONE
from sla2_kernels.numerics import FP8_E4M3_MAX, INT8_MAX, LOG2E, TINY_SCALE
from sla2cli.ops.blockwise import blockwise_sla2, to_blocks
from sla2cli.ops.complement import complement_map
from sla2cli.ops.geometry import num_blocks
from sla2cli.ops.lowbit_speed import UNIT, find_measurement, shape_class
from sla2cli.ops.reference import attention_from_block_weights, expand_block_values
from sla2cli.ops.sampled_reference import (
    KEY_CHUNK,
    QueryBlockSample,
    chunk_starts,
    from_query_blocks,
    gather_key_rows,
    sample_query_blocks,
    to_query_blocks,
)

# The concrete modes (QUANT_NONE, QUANT_INT8, QUANT_INT8_FP8) and their kernel codes live in
# sla2_kernels.modes; `auto` is a request, resolved per device below.
QUANT_AUTO = "auto"
REQUESTABLE_QUANT_MODES = (*QUANT_MODES, QUANT_AUTO)
# Names that checkpoints written by earlier versions may hold: `int8-fp16` (INT8 Q.K^T, fp16 P.V)
# became `int8` (P.V in the input's precision) once per-block key scales made fp16 P.V the slow part.
LEGACY_QUANT_NAMES = {"int8-fp16": QUANT_INT8}

FP8_CAPABILITY = (8, 9)
INT8_CAPABILITY = (8, 0)


class AutoQuant(NamedTuple):
    """What `auto` runs for one call and the one line that says why (printed by the CLI)."""

    mode: str
    reason: str


def supported_quant_modes(device: torch.device | str) -> tuple[str, ...]:
    """Modes this device runs. CPU runs every mode (through the fake-quant emulation)."""
    device = torch.device(device)
    if device.type != "cuda":
        return QUANT_MODES
    capability = torch.cuda.get_device_capability(device)
    modes = [QUANT_NONE]
    if capability >= INT8_CAPABILITY:
        modes.append(QUANT_INT8)
    if capability >= FP8_CAPABILITY:
        modes.append(QUANT_INT8_FP8)
    return tuple(modes)


def runnable_lowbit_mode(device: torch.device | str) -> str:
    """The low-bit mode this device runs whatever its speed (int8; none where it has none): what the
    bench times and the report compares. FP8 P.V measured no faster and less exact (module docstring)."""
    return QUANT_INT8 if QUANT_INT8 in supported_quant_modes(device) else QUANT_NONE


def check_quant(mode: str) -> str:
    """A requestable mode in lower case; which ones a GPU runs is decided at call time."""
    if not isinstance(mode, str) or mode.lower() not in REQUESTABLE_QUANT_MODES:
        raise ValueError(f"quant must be one of {', '.join(REQUESTABLE_QUANT_MODES)}; got {mode!r}")
    return mode.lower()


def check_runnable(mode: str | None, device: torch.device | str) -> str:
    """The requested mode (lower case, None -> none), or an error naming what this GPU runs; `auto` always runs."""
    requested = QUANT_NONE if mode is None else check_quant(mode)
    supported = supported_quant_modes(device)
    if requested != QUANT_AUTO and requested not in supported:
        raise ValueError(
            f"quant {requested!r} needs a GPU this one is not ({_describe(torch.device(device))}); "
            f"it supports: {', '.join(supported)} (or auto)"
        )
    return requested


def needs_backward(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors records a graph: `auto` decides from training measurements then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def choose_auto_quant(device: torch.device | str, shape: Sequence[int], training: bool) -> AutoQuant:
    """`auto` for a (B, H, L, D) call: a low-bit mode only where ops.lowbit_speed holds a measurement on
    this GPU (by name), head dim, shape class and pass that found it faster than bf16; bf16 otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return AutoQuant(QUANT_NONE, f"auto: none (the low-bit modes are emulated on {device.type}, never faster)")
    name = torch.cuda.get_device_name(device)
    batch, heads, length, head_dim = shape
    rows = batch * heads * length
    entry = find_measurement(name, head_dim, training, rows)
    if entry is None:
        what = "forward + backward" if training else "forward"
        return AutoQuant(QUANT_NONE, (
            f"auto: bf16 (no recorded measurement of a low-bit mode against bf16 on {name} for head dim "
            f"{head_dim}, {shape_class(rows)}, {what}; see benchmarks/results/)"
        ))
    measured = (
        f"{entry.lowbit:g} vs {entry.bf16:g} {UNIT} at {entry.shape}{' fwd+bwd' if training else ''}; "
        f"measured in {entry.source}"
    )
    if entry.lowbit_faster and entry.mode in supported_quant_modes(device):
        return AutoQuant(entry.mode, f"auto: {entry.mode} ({entry.mode} is faster than bf16 on {name} at this "
                                     f"shape: {measured})")
    return AutoQuant(QUANT_NONE, f"auto: bf16 ({entry.mode} is not faster on {name} at this shape: {measured})")


AUTO_RULE = (
    "auto: a low-bit mode only where a recorded measurement (benchmarks/results/) found it faster than bf16 on "
    "that GPU, head dim and shape; bf16 elsewhere"
)


def describe_auto_quant(shape: Sequence[int], training: bool) -> str:
    """The CLI's line on `auto` for a (B, H, L, D) call on this machine's GPU; the rule itself without one."""
    if not torch.cuda.is_available():
        return f"{AUTO_RULE} (no CUDA GPU here to decide for)"
    return choose_auto_quant("cuda", shape, training).reason


def resolve_quant_mode(
    mode: str | None, device: torch.device | str, shape: Sequence[int] | None = None, training: bool = False
) -> str:
    """The concrete mode a (B, H, L, D) call runs: `auto` as choose_auto_quant decides (it needs the shape);
    an explicit mode as asked, or an error naming the options."""
    requested = check_runnable(mode, device)
    if requested != QUANT_AUTO:
        return requested
    if shape is None:
        raise ValueError("quant 'auto' is resolved per call and needs the attention shape (B, H, L, D)")
    return choose_auto_quant(device, shape, training).mode


def _describe(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


# ----------------------------------------------------------------- rounding, shared with the kernels' contract


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: what `(x + 0.5 * sign(x)).to(int8)` does in the kernels."""
    return torch.trunc(x + 0.5 * torch.sign(x))


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per row: (integer values as float32 (B, H, L, D), scales (B, H, L))."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(TINY_SCALE) / INT8_MAX
    return round_half_away(x * (1.0 / scale)[..., None]), scale


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over the sequence (float32): removes the shared offset INT8 would waste range on."""
    k = k.float()
    return k - k.mean(dim=2, keepdim=True)


def channel_gains(smoothed_keys: torch.Tensor) -> torch.Tensor:
    """(B, H, 1, D): g = sqrt(max |K - mean|) per channel; K / g and Q * g give the same Q.K^T."""
    return smoothed_keys.abs().amax(dim=2, keepdim=True).clamp_min(TINY_SCALE).sqrt()


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per block of rows: (values (B, H, T, block, D), scales (B, H, T)).

    Rows past the end (padding of the last block) are zero and do not affect its scale.
    """
    blocks = to_blocks(x.float(), block)
    scale = blocks.abs().amax(dim=(-1, -2)).clamp_min(TINY_SCALE) / INT8_MAX
    return round_half_away(blocks * (1.0 / scale)[..., None, None]), scale


def quantize_queries_keys(
    q: torch.Tensor, k: torch.Tensor, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The low-bit Q and K the kernels use: INT8 rows of Q * g, INT8 key blocks of (K - mean) / g.

    Returns (q_int (B, H, L, D), q_scale (B, H, L), k_int (B, H, Tn, block_k, D), k_scale (B, H, Tn)).
    """
    smoothed = smooth_keys(k)
    gains = channel_gains(smoothed)
    q_int, q_scale = quantize_int8_rows(q.float() * gains)
    k_int, k_scale = quantize_int8_blocks(smoothed * (1.0 / gains), block_k)
    return q_int, q_scale, k_int, k_scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to FP8 e4m3 (nearest even, as the GPU's conversion) and back to float32."""
    return x.to(torch.float8_e4m3fn).float()


# ----------------------------------------------------------------- the oracle


def key_statistics(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the sequence, channel gains g), each (B, H, 1, D) float32, in passes of KEY_CHUNK tokens so
    that no float32 copy of K is made (smooth_keys and channel_gains, computed without holding K - mean)."""
    length = k.shape[2]
    total = torch.zeros(*k.shape[:2], 1, k.shape[3], dtype=torch.float64, device=k.device)
    for start in chunk_starts(length):
        total += k[:, :, start:start + KEY_CHUNK].double().sum(dim=2, keepdim=True)
    mean = (total / length).float()
    largest = torch.zeros_like(mean)
    for start in chunk_starts(length):
        chunk = (k[:, :, start:start + KEY_CHUNK].float() - mean).abs().amax(dim=2, keepdim=True)
        largest = torch.maximum(largest, chunk)
    return mean, largest.clamp_min(TINY_SCALE).sqrt()


def value_channel_scales(v: torch.Tensor) -> torch.Tensor:
    """Per (batch, head, channel) FP8 scale: the channel's largest magnitude maps to 448. (B, H, D) float32,
    in passes of KEY_CHUNK tokens (a max is exact in any order), so no float32 copy of V is made."""
    largest = torch.zeros(*v.shape[:2], v.shape[3], dtype=torch.float32, device=v.device)
    for start in chunk_starts(v.shape[2]):
        largest = torch.maximum(largest, v[:, :, start:start + KEY_CHUNK].float().abs().amax(dim=2))
    return largest.clamp_min(TINY_SCALE) / FP8_E4M3_MAX


def lowbit_sparse_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, block_q: int, block_k: int, mode: str,
    sample: QueryBlockSample | None = None,
) -> torch.Tensor:
    """The quantised sparse branch alone, float32: online softmax over the LUT's blocks in order.

    Returns (B, H, L, D), or with `sample` only its rows (B, H, R, D), computed from those query blocks
    alone: each key block is quantised where it is used (its INT8 scale is its own; the mean and channel
    gains come from a chunked pass over K), so memory does not grow with L beyond the selected keys.
    """
    if mode not in (QUANT_INT8_FP8, QUANT_INT8):
        raise ValueError(f"lowbit_sparse_branch needs a low-bit mode, got {mode!r}")
    length, dim = q.shape[2], q.shape[3]
    if sample is None:
        sample = sample_query_blocks(length, block_q, num_blocks(length, block_q), q.device)
    mean, gains = key_statistics(k)
    q_int, q_scale = quantize_int8_rows(q.index_select(2, sample.rows).float() * gains)
    q_int = to_query_blocks(q_int, sample, block_q)  # (B, H, n, bq, D)
    q_scale = to_query_blocks(q_scale[..., None], sample, block_q)[..., 0]  # (B, H, n, bq)
    v_scale = value_channel_scales(v) if mode == QUANT_INT8_FP8 else None
    logit_scale = LOG2E / math.sqrt(dim)

    lut_rows = lut.index_select(2, sample.blocks)
    row_max = torch.full(q_int.shape[:-1], float("-inf"), device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(q_int.shape, device=q.device)
    for t in range(lut.shape[-1]):
        step = lut_rows[..., t : t + 1]  # (B, H, n, 1): one key block per query block
        keys, key_valid = gather_key_rows(k, step, block_k)  # (B, H, n, bk, D), (B, H, n, bk)
        smoothed = (keys.float() - mean[:, :, None]) * (1.0 / gains)[:, :, None] * key_valid[..., None]
        k_scale = smoothed.abs().amax(dim=(-1, -2)).clamp_min(TINY_SCALE) / INT8_MAX  # (B, H, n)
        k_t = round_half_away(smoothed * (1.0 / k_scale)[..., None, None])
        v_t = gather_key_rows(v, step, block_k)[0].float()
        if v_scale is not None:
            v_t = to_fp8(v_t / v_scale[:, :, None, None, :])
        step_scale = q_scale * logit_scale * k_scale[..., None]  # (B, H, n, bq)
        raw = torch.matmul(q_int.double(), k_t.double().transpose(-1, -2)).float()  # INT32 products, exact
        raw = raw.masked_fill(~key_valid[..., None, :], float("-inf"))
        new_max = torch.maximum(row_max, raw.amax(dim=-1) * step_scale)
        probs = torch.exp2(torch.addcmul(-new_max[..., None], raw, step_scale[..., None]))
        rescale = torch.exp2(row_max - new_max)
        row_sum = row_sum * rescale + probs.sum(dim=-1)
        if mode == QUANT_INT8_FP8:
            probs_q = to_fp8(probs * FP8_E4M3_MAX)
        else:
            probs_q = probs.to(v.dtype).float()
        acc = acc * rescale[..., None] + torch.matmul(probs_q, v_t)
        row_max = new_max
    out = acc / row_sum[..., None]
    if v_scale is not None:
        out = out * (v_scale / FP8_E4M3_MAX)[:, :, None, None, :]
    return from_query_blocks(out, sample)


def sla2_lowbit_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    *,
    mode: str,
    alpha: torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 64,
) -> torch.Tensor:
    """Low-bit SLA2 forward for a given LUT: quantised sparse branch, input-precision linear branch, alpha mix.

    Returns (B, H, L, D) in q's dtype. Every block selected (or alpha None) means no linear branch.
    """
    out = lowbit_sparse_branch(q, k, v, lut, block_q, block_k, mode)
    length = q.shape[2]
    if alpha is not None and lut.shape[-1] < num_blocks(length, block_k):
        num_k_blocks = num_blocks(length, block_k)
        selected = 1.0 - complement_map(lut, num_k_blocks, torch.float32).view(*lut.shape[:-1], num_k_blocks)
        no_sparse = torch.zeros(*q.shape[:2], num_blocks(length, block_q), device=q.device)
        linear = attention_from_block_weights(
            q.float(), k.float(), v.float(), selected, no_sparse, block_q, block_k, all_selected=False
        )
        mix = _alpha_rows(alpha, q, block_q)
        out = mix * out + (1.0 - mix) * linear
    return out.to(q.dtype)


def _alpha_rows(alpha: torch.Tensor, q: torch.Tensor, block_q: int) -> torch.Tensor:
    """alpha per query row, (B, H, L, 1) float32, from its per-query-block values."""
    length = q.shape[2]
    blocks = alpha.float().expand(*q.shape[:2], num_blocks(length, block_q))
    return expand_block_values(blocks, length, block_q, dim=-1)[..., None]


def emulated_lowbit(
    exact: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    block_q: int,
    block_k: int,
    mode: str,
) -> torch.Tensor:
    """The CPU path's low-bit output from its exact one, with the exact one's gradients (straight-through).

    The two outputs differ only in the sparse branch, weighted by alpha; so the low-bit output is
    exact + alpha * (lowbit sparse - exact sparse), which reuses the exact path's linear branch.
    """
    with torch.no_grad():
        exact_sparse = blockwise_sla2(q, k, v, lut, None, block_q, block_k).float()
        shift = lowbit_sparse_branch(q, k, v, lut, block_q, block_k, mode) - exact_sparse
        if alpha is not None and lut.shape[-1] < num_blocks(q.shape[2], block_k):
            shift = shift * _alpha_rows(alpha, q, block_q)
    return exact + shift.to(exact.dtype)
