"""Checks of SLA2's parameters and of the op's inputs: one UserError (a ValueError) that names the argument.

The one owner of these rules: the op, the layer, conversion, checkpoints, training and every command call
the functions here (`name` is what the caller's user typed, e.g. `--sparsity`). Commands turn the error
into one line with exit code 2.
"""

from __future__ import annotations

import math

import torch

from sla2cli.errors import UserError
from sla2cli.ops.geometry import SUPPORTED_HEAD_DIMS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCK = 16  # the kernels' tl.dot needs tiles of at least 16 rows


def check_sparsity(value: object, name: str = "sparsity") -> float:
    """A sparsity: the share of key blocks per query-block row sent to the linear branch, in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise UserError(f"{name} must be a number in [0, 1) (e.g. 0.97), got {value!r}")
    return float(value)


def check_head_dim(value: object, name: str = "head dim") -> int:
    """A head dimension the kernels are built for."""
    if isinstance(value, bool) or value not in SUPPORTED_HEAD_DIMS:
        choices = " or ".join(map(str, SUPPORTED_HEAD_DIMS))
        raise UserError(f"{name} must be {choices} (what the SLA2 kernels support), got {value!r}")
    return int(value)


def check_block_size(value: object, name: str) -> int:
    """A query or key block size: a power of two of at least MIN_BLOCK rows."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_BLOCK or value & (value - 1):
        raise UserError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value!r}")
    return value


def check_timestep(value: object, name: str = "timestep") -> float:
    """A noise level of the flow: 0 is the clean clip, 1 pure noise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{name} must lie in [0, 1] (1 is pure noise), got {value!r}")
    return float(value)


def check_positive_int(value: object, name: str) -> int:
    """A count that must be at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def is_positive_number(value: object) -> bool:
    """A finite number above 0 (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_positive_number(value: object, name: str, example: str = "") -> float:
    """A rate, temperature or scale: finite and above 0."""
    if not is_positive_number(value):
        hint = f" (e.g. {example})" if example else ""
        raise UserError(f"{name} must be a positive number{hint}, got {value!r}")
    return float(value)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    alpha: torch.Tensor | None,
    proj_q: torch.Tensor | None,
    proj_k: torch.Tensor | None,
    block_q: int,
    block_k: int,
) -> None:
    """Raise ValueError naming the first bad argument; (B, H, L, D) layout expected."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise UserError(f"{name} must have rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise UserError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise UserError(
                f"{name} shape {tuple(t.shape)} does not match q shape {tuple(q.shape)}; "
                "self-attention needs equal shapes"
            )
        if t.dtype != q.dtype:
            raise UserError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise UserError(f"{name} is on {t.device} but q is on {q.device}")
    batch, heads, length, head_dim = q.shape
    check_head_dim(head_dim, "q's head dim")
    if min(batch, heads, length) < 1:
        raise UserError(f"q must have B, H, L >= 1, got shape {tuple(q.shape)}")
    check_sparsity(sparsity)
    check_block_size(block_q, "block_q")
    check_block_size(block_k, "block_k")
    if alpha is not None:
        if not isinstance(alpha, torch.Tensor):
            raise UserError(f"alpha must be a tensor or None, got {type(alpha).__name__}")
        if alpha.device != q.device:
            raise UserError(f"alpha is on {alpha.device} but q is on {q.device}")
        num_q_blocks = (length + block_q - 1) // block_q
        target = (batch, heads, num_q_blocks)
        try:
            fits = torch.broadcast_shapes(alpha.shape, target) == torch.Size(target)
        except RuntimeError:
            fits = False
        if not fits:
            raise UserError(
                f"alpha shape {tuple(alpha.shape)} is not broadcastable to (B, H, T_m) = "
                f"{(batch, heads, num_q_blocks)}"
            )
    for name, w in (("proj_q", proj_q), ("proj_k", proj_k)):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor):
            raise UserError(f"{name} must be a tensor or None, got {type(w).__name__}")
        if w.shape != (head_dim, head_dim):
            raise UserError(f"{name} must have shape (D, D) = {(head_dim, head_dim)}, got {tuple(w.shape)}")
        if w.device != q.device:
            raise UserError(f"{name} is on {w.device} but q is on {q.device}")
