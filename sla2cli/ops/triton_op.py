"""The Triton path as a torch custom op with autograd and a fake (meta) implementation.

Registered through torch.library so that torch.compile(fullgraph=True) traces a model through it
without graph breaks; k_sel is read from the look-up table's shape, never from data, so nothing
in the forward waits on the GPU.

The kernel modules load on first use (`sla2_kernels` imports them when an entry point is first asked
for): Triton is optional (not installed off Linux), and the CPU interpreter (TRITON_INTERPRET) must be
chosen before a kernel module loads.
`quant` is a mode's kernel code (sla2_kernels.modes.kernel_code).
"""

from __future__ import annotations

import torch

import sla2_kernels
from sla2_kernels.modes import QUANT_NONE, kernel_code
from sla2cli.ops.complement import complement_state_grads, complement_states
from sla2cli.ops.geometry import LINEAR_EPS, num_blocks

NO_QUANT = kernel_code(QUANT_NONE)


def _linear_alpha(alpha: torch.Tensor | None, lut: torch.Tensor, length: int, block_k: int):
    """alpha as the kernels take it: None when there is no linear branch (every block selected)."""
    return alpha if alpha is not None and lut.shape[-1] < num_blocks(length, block_k) else None


def _no_states(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (comp_states, comp_norms) a forward returns when it saves none."""
    return q.new_empty(0), q.new_empty(0, dtype=torch.float32)


def _complement_states(k, v, lut, block_k):
    states, norms = sla2_kernels.key_block_states(k, v, block_k)
    return complement_states(lut, states, norms)


@torch.library.custom_op("sla2::forward", mutates_args=(), device_types=("cuda", "cpu"))
def sla2_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    block_q: int,
    block_k: int,
    save: bool,
    quant: int = NO_QUANT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, out_sparse, comp_states, comp_norms); all but out are empty unless `save`, and the
    complement states are empty too without a linear branch. The backward reuses them instead of building
    them again (measured 5-7% of forward+backward). quant: a mode's kernel code."""
    lut = lut.contiguous()  # compiled graphs may hand over other layouts; kernels index densely
    alpha = _linear_alpha(alpha, lut, q.shape[2], block_k)
    alpha = alpha.contiguous() if alpha is not None else None
    comp_states = comp_norms = None
    if alpha is not None:
        comp_states, comp_norms = _complement_states(k, v, lut, block_k)
    if quant != NO_QUANT and save:
        # Straight-through: the backward is the unquantised op's, so it gets the unquantised softmax
        # statistics. Feeding it the low-bit ones instead measured 5% gradient error (CPU, L=300).
        _, lse, out_sparse = sla2_kernels.sla2_forward(
            q, k, v, lut, alpha, comp_states, comp_norms, block_q, block_k, True, LINEAR_EPS
        )
        out, _, _ = sla2_kernels.sla2_forward(
            q, k, v, lut, alpha, comp_states, comp_norms, block_q, block_k, False, LINEAR_EPS, quant
        )
    else:
        out, lse, out_sparse = sla2_kernels.sla2_forward(
            q, k, v, lut, alpha, comp_states, comp_norms, block_q, block_k, save, LINEAR_EPS, quant
        )
    if not save or comp_states is None:
        comp_states, comp_norms = _no_states(q)
    return out, lse, out_sparse, comp_states, comp_norms


@sla2_forward_op.register_fake
def _sla2_forward_fake(q, k, v, lut, alpha, block_q, block_k, save, quant=NO_QUANT):
    batch, heads, length, head_dim = q.shape
    if not save:
        return torch.empty_like(q), q.new_empty(0, dtype=torch.float32), q.new_empty(0), *_no_states(q)
    lse, out_sparse = q.new_empty(batch, heads, length, dtype=torch.float32), torch.empty_like(q)
    if _linear_alpha(alpha, lut, length, block_k) is None:
        return torch.empty_like(q), lse, out_sparse, *_no_states(q)
    num_q_blocks = num_blocks(length, block_q)
    return (torch.empty_like(q), lse, out_sparse,
            q.new_empty(batch, heads, num_q_blocks, head_dim, head_dim),
            q.new_empty(batch, heads, num_q_blocks, head_dim, dtype=torch.float32))


@torch.library.custom_op("sla2::backward", mutates_args=(), device_types=("cuda", "cpu"))
def sla2_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    out_sparse: torch.Tensor,
    lse: torch.Tensor,
    comp_states: torch.Tensor,
    comp_norms: torch.Tensor,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dalpha); dalpha is zeros with every block selected, empty without alpha.

    comp_states, comp_norms: the forward's complement states (empty without a linear branch)."""
    last_dim_contiguous = sla2_kernels.last_dim_contiguous
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    lut, lse = lut.contiguous(), lse.contiguous()
    alpha = alpha.contiguous() if alpha is not None else None
    if grad_out.stride() != out_sparse.stride():
        grad_out = torch.empty_like(out_sparse).copy_(grad_out)
    linear_alpha = _linear_alpha(alpha, lut, q.shape[2], block_k)
    if linear_alpha is None:
        comp_states = comp_norms = None
    dq, delta, grad_sparse, dalpha, dstate_q, dnorm_q = sla2_kernels.sla2_backward_query(
        grad_out, q, k, v, lut, linear_alpha, out_sparse, lse, comp_states, comp_norms,
        block_q, block_k, LINEAR_EPS,
    )
    key_dstates = key_dnorms = None
    if linear_alpha is not None:
        key_dstates, key_dnorms = complement_state_grads(lut, num_blocks(q.shape[2], block_k), dstate_q, dnorm_q)
    dk, dv = sla2_kernels.sla2_backward_key(
        grad_sparse, q, k, v, lut, lse, delta, key_dstates, key_dnorms, block_q, block_k
    )
    if alpha is None:
        dalpha = q.new_empty(0, dtype=torch.float32)
    elif dalpha is None:
        dalpha = torch.zeros_like(alpha)
    return dq, dk, dv, dalpha


@sla2_backward_op.register_fake
def _sla2_backward_fake(grad_out, q, k, v, lut, alpha, out_sparse, lse, comp_states, comp_norms, block_q, block_k):
    dalpha = torch.empty_like(alpha) if alpha is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dalpha


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lut, alpha, block_q, block_k, save, _quant = inputs
    _, lse, out_sparse, comp_states, comp_norms = output
    ctx.save_for_backward(q, k, v, lut, alpha, out_sparse, lse, comp_states, comp_norms)
    ctx.blocks = (block_q, block_k)
    ctx.has_alpha = alpha is not None


def _backward(ctx, grad_out, *_grads_of_saved_outputs):
    q, k, v, lut, alpha, out_sparse, lse, comp_states, comp_norms = ctx.saved_tensors
    block_q, block_k = ctx.blocks
    dq, dk, dv, dalpha = sla2_backward_op(
        grad_out, q, k, v, lut, alpha if ctx.has_alpha else None, out_sparse, lse, comp_states, comp_norms,
        block_q, block_k,
    )
    return dq, dk, dv, None, dalpha if ctx.has_alpha else None, None, None, None, None


sla2_forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sla2::block_means", mutates_args=(), device_types=("cuda", "cpu"))
def block_means_op(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of `block` rows of (B, H, L, D), float32 (B, H, T, D)."""
    return sla2_kernels.block_means(x, block)


@block_means_op.register_fake
def _block_means_fake(x, block):
    batch, heads, length, head_dim = x.shape
    return x.new_empty(batch, heads, num_blocks(length, block), head_dim, dtype=torch.float32)


@torch.library.custom_op("sla2::route", mutates_args=(), device_types=("cuda", "cpu"))
def route_op(
    q: torch.Tensor, k: torch.Tensor, proj: torch.Tensor | None, block_q: int, block_k: int, k_sel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 (B, H, T_m, T_n), look-up table int32 (B, H, T_m, k_sel)); proj = W_q W_k^T or None."""
    return sla2_kernels.route_blocks(q, k, proj, block_q, block_k, k_sel)


@route_op.register_fake
def _route_fake(q, k, proj, block_q, block_k, k_sel):
    batch, heads, length, _ = q.shape
    num_q_blocks = num_blocks(length, block_q)
    return (q.new_empty(batch, heads, num_q_blocks, num_blocks(length, block_k), dtype=torch.float32),
            q.new_empty(batch, heads, num_q_blocks, k_sel, dtype=torch.int32))


def triton_sla2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    block_q: int,
    block_k: int,
    quant: int = NO_QUANT,
) -> torch.Tensor:
    """Autograd-aware Triton SLA2; saves backward state only when a gradient is wanted.

    quant: the mode's kernel code. With a low-bit `quant` the backward is the unquantised one
    (straight-through); a forward that must save for it also runs the unquantised kernel for the
    softmax statistics.
    """
    batch, heads, length, _ = q.shape
    if alpha is not None:
        alpha = alpha.to(torch.float32).expand(batch, heads, num_blocks(length, block_q)).contiguous()
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, alpha)
    )
    return sla2_forward_op(q, k, v, lut.contiguous(), alpha, block_q, block_k, wants_grad, quant)[0]
