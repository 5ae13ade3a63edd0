"""Input checks for the attention op: one ValueError that names the argument at fault."""

from __future__ import annotations

import torch

from sla2cli.ops.geometry import SUPPORTED_HEAD_DIMS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match q shape {tuple(q.shape)}; "
                "self-attention needs equal shapes"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch, heads, length, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if min(batch, heads, length) < 1:
        raise ValueError(f"q must have B, H, L >= 1, got shape {tuple(q.shape)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block!r}")
    if alpha is not None:
        if not isinstance(alpha, torch.Tensor):
            raise ValueError(f"alpha must be a tensor or None, got {type(alpha).__name__}")
        if alpha.device != q.device:
            raise ValueError(f"alpha is on {alpha.device} but q is on {q.device}")
        num_q_blocks = (length + block_q - 1) // block_q
        target = (batch, heads, num_q_blocks)
        try:
            fits = torch.broadcast_shapes(alpha.shape, target) == torch.Size(target)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"alpha shape {tuple(alpha.shape)} is not broadcastable to (B, H, T_m) = "
                f"{(batch, heads, num_q_blocks)}"
            )
    for name, w in (("proj_q", proj_q), ("proj_k", proj_k)):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(w).__name__}")
        if w.shape != (head_dim, head_dim):
            raise ValueError(f"{name} must have shape (D, D) = {(head_dim, head_dim)}, got {tuple(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"{name} is on {w.device} but q is on {q.device}")
