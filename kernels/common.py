"""Small helpers shared by the SLA2 Triton kernels, and the launch-settings type."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


class Launch(NamedTuple):
    """How a kernel is launched: the tables of launch settings in each kernel module hold these.

    accumulate_linear picks the forward kernel's epilogue (see sla2_kernels.forward); the other
    kernels have one epilogue and leave it False.
    """

    num_warps: int
    num_stages: int
    accumulate_linear: bool = False


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs keep full float32 products (tests need 1e-5); 16-bit inputs use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_stride_args(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, D) tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels read rows as contiguous vectors; copy only when the feature dim is strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def feature_softmax(x):
    """phi(x): softmax over the feature axis (axis 1) of a float32 tile."""
    shifted = x - tl.max(x, axis=1)[:, None]
    e = tl.exp(shifted)
    return e / tl.sum(e, axis=1)[:, None]
