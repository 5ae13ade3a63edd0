"""alpha's gradient when every key block is selected: zeros, on every path.

With k_sel = T_n there is no linear branch and O = O_s, so alpha does not enter the output and its
gradient is zero. The Triton backward returns those zeros; the PyTorch paths, which skip alpha there,
would leave it out of the graph (a None gradient, or an error from torch.autograd.grad). Tying alpha
in at a zero gradient gives callers (an optimizer, a training loop that reads .grad) one structure.
"""

from __future__ import annotations

import torch


class _ZeroGradientFor(torch.autograd.Function):
    """Identity on `out`; `alpha` gets a zero gradient of its own shape, dtype and device."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        ctx.alpha_like = (alpha.shape, alpha.dtype, alpha.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.alpha_like
        return grad_out, torch.zeros(shape, dtype=dtype, device=device)


def with_unused_alpha(out: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """`out`, with `alpha` (when it needs a gradient) in its graph at a zero gradient."""
    if alpha is None or not (torch.is_grad_enabled() and alpha.requires_grad):
        return out
    return _ZeroGradientFor.apply(out, alpha)
