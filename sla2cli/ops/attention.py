"""Public SLA2 attention entry points: validate, route, then run the fastest available backend."""

from __future__ import annotations

import torch

from sla2_kernels.modes import kernel_code
from sla2cli.ops.backend import triton_enabled
from sla2cli.ops.blockwise import blockwise_sla2
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from sla2cli.ops.quantization import QUANT_NONE, emulated_lowbit, needs_backward, resolve_quant_mode
from sla2cli.ops.routing import route
from sla2cli.ops.triton_op import triton_sla2
from sla2cli.ops.validation import check_attention_inputs


def sla2_attention_routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    *,
    alpha: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    quant: str | None = None,
) -> torch.Tensor:
    """SLA2 attention for a given block look-up table (B, H, T_m, k_sel) from `route`.

    quant: None/"none", "int8-fp8", "int8" or "auto" (see sla2cli.ops.quantization): a low-bit
    forward of the sparse branch with the unquantised gradients (straight-through). `auto` is decided
    for this call's shape, and for training when it records a graph.
    """
    mode = resolve_quant_mode(quant, q.device, q.shape, training=needs_backward(q, k, v, alpha))
    if triton_enabled(q):
        return triton_sla2(q, k, v, lut, alpha, block_q, block_k, kernel_code(mode))
    out = blockwise_sla2(q, k, v, lut, alpha, block_q, block_k)
    if mode == QUANT_NONE:
        return out
    return emulated_lowbit(out, q, k, v, lut, alpha, block_q, block_k, mode)


def sla2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    alpha: torch.Tensor | None = None,
    proj_q: torch.Tensor | None = None,
    proj_k: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    quant: str | None = None,
) -> torch.Tensor:
    """SLA2 attention (hard routing) on (B, H, L, D) tensors; returns (B, H, L, D) in the input dtype.

    Differentiable in q, k, v and alpha (a zero gradient when every key block is selected, on every
    backend). The router (top-k) has no gradient. `quant` as in `sla2_attention_routed`.
    """
    check_attention_inputs(
        q, k, v, sparsity=sparsity, alpha=alpha, proj_q=proj_q, proj_k=proj_k,
        block_q=block_q, block_k=block_k,
    )
    routing = route(q, k, sparsity=sparsity, proj_q=proj_q, proj_k=proj_k, block_q=block_q, block_k=block_k)
    return sla2_attention_routed(
        q, k, v, routing.lut, alpha=alpha, block_q=block_q, block_k=block_k, quant=quant
    )


def sla2_attention_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The same op on diffusers' (B, L, H, D) layout: strided views in and out, no copies."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a rank-4 tensor (B, L, H, D)")
    out = sla2_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)
