"""Which implementation runs the op: the Triton kernels or the PyTorch block-gather path."""

from __future__ import annotations

import os

import torch


def triton_enabled(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors; CPU tensors take the PyTorch block-gather path.

    SLA2_BACKEND=torch forces the PyTorch path on GPU too (for comparisons); SLA2_BACKEND=triton
    sends CPU tensors through the Triton interpreter (needs TRITON_INTERPRET=1; slow, for tests).
    """
    backend = os.environ.get("SLA2_BACKEND", "").lower()
    if backend == "torch":
        return False
    if t.is_cuda:
        return True
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"
