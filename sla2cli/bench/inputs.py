"""Random attention inputs shared by every provider at one shape, and the forward+backward step.

Random normal values (never zeros: a zero input lets kernels skip work or hit special cases) from a
fixed seed, so every provider sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sla2cli.bench.cases import FORWARD_BACKWARD, AttentionShape
from sla2cli.ops.geometry import DEFAULT_BLOCK_Q, num_blocks


@dataclass
class AttentionInputs:
    """q, k, v: (B, H, L, D); alpha: (B, H, T_m) mixing weights in (0.05, 0.95) for SLA2, so both
    branches and the mix run; grad_out: the upstream gradient for forward+backward, else None."""

    shape: AttentionShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    grad_out: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        """Tensors that receive gradients in forward+backward."""
        return (self.q, self.k, self.v, self.alpha)

    def clear_grads(self) -> None:
        for tensor in self.leaves:
            tensor.grad = None


def make_inputs(
    shape: AttentionShape, mode: str, dtype: torch.dtype, device: torch.device, seed: int
) -> AttentionInputs:
    """Inputs for one shape; they require grad in forward+backward mode."""
    generator = torch.Generator(device=device).manual_seed(seed)
    training = mode == FORWARD_BACKWARD

    def normal(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=generator, device=device, dtype=dtype).requires_grad_(training)

    num_q_blocks = num_blocks(shape.length, DEFAULT_BLOCK_Q)
    alpha = torch.rand(shape.batch, shape.heads, num_q_blocks, generator=generator, device=device)
    alpha = (0.05 + 0.9 * alpha).requires_grad_(training)
    q, k, v = normal(*shape.dims), normal(*shape.dims), normal(*shape.dims)
    grad_out = torch.randn(*shape.dims, generator=generator, device=device, dtype=dtype) if training else None
    return AttentionInputs(shape=shape, q=q, k=k, v=v, alpha=alpha, grad_out=grad_out)


def forward_backward(call: Callable[[], torch.Tensor], inputs: AttentionInputs) -> Callable[[], None]:
    """One training step of the call: forward, then backward of grad_out into q, k, v (and alpha)."""

    def step() -> None:
        inputs.clear_grads()
        call().backward(inputs.grad_out)

    return step
