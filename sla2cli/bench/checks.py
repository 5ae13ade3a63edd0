"""Correctness gates: every provider's output is compared with a float32 reference before it is timed.

A fast wrong kernel is worse than a slow right one, so a mismatch stops the benchmark (KernelMismatch)
instead of producing a row. The references run on a slice (a few heads, or a few query rows) so that
they stay cheap next to the timed call even at 75K tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sla2cli.bench.inputs import AttentionInputs

CHECK_HEADS = 2  # heads compared in the forward check
CHECK_ROWS = 1024  # query rows compared where a reference needs the full L x L matrix
GRAD_CHECK_LENGTH = 2048  # sequence length of the small problem that checks dense backward passes

# Relative L2 error allowed against a float32 reference, by input dtype: bf16 keeps 8 mantissa bits.
FORWARD_TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2.5e-2}
BACKWARD_FACTOR = 2.0  # gradients go through more low-precision steps than the output


class KernelMismatch(RuntimeError):
    """A provider's output or gradient disagrees with its reference: the kernel is wrong, not slow."""


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float32 (inf when value is not finite)."""
    value, reference = value.float(), reference.float()
    if not torch.isfinite(value).all():
        return float("inf")
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def require_close(
    provider: str, what: str, value: torch.Tensor, reference: torch.Tensor, tolerance: float
) -> None:
    error = relative_error(value, reference)
    if not error <= tolerance:
        raise KernelMismatch(
            f"{provider}: {what} differs from the reference by {error:.3g} (relative L2; allowed "
            f"{tolerance:.3g}); this kernel is wrong here, so it is not timed"
        )


def dense_attention_float32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V in float32, written out (the math every dense kernel must match)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ vf


def output_and_grads(
    call: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], grad_out: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run call(); with grad_out, also back-propagate it and return the leaves' gradients."""
    for leaf in leaves:
        leaf.grad = None
    out = call()
    if grad_out is None:
        return out.detach(), []
    out.backward(grad_out)
    grads = [None if leaf.grad is None else leaf.grad.detach().clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return out.detach(), grads


def fresh_leaves(tensors: Sequence[torch.Tensor], requires_grad: bool) -> list[torch.Tensor]:
    """Detached contiguous copies, so that a reference builds its own autograd graph."""
    return [t.detach().clone().contiguous().requires_grad_(requires_grad) for t in tensors]


def head_slice(inputs: AttentionInputs) -> slice:
    return slice(0, min(CHECK_HEADS, inputs.shape.heads))


def training(inputs: AttentionInputs) -> bool:
    return inputs.grad_out is not None
