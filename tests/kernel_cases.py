"""Shared helpers for kernel tests: random inputs and relative errors."""

from __future__ import annotations

import torch


def random_qkv(batch, heads, length, head_dim, dtype, seed, requires_grad=True, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(batch, heads, length, head_dim, generator=generator).to(device=device, dtype=dtype)
        for _ in range(3)
    ]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def random_alpha(batch, heads, num_q_blocks, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed + 1)
    alpha = torch.rand(batch, heads, num_q_blocks, generator=generator).to(device)
    return alpha.requires_grad_(True)


def rel_l2(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """‖a − e‖ / ‖e‖ in float64; a missing gradient counts as zeros."""
    if expected is None and actual is None:
        return 0.0
    if expected is None:
        expected = torch.zeros_like(actual)
    if actual is None:
        actual = torch.zeros_like(expected)
    expected64, actual64 = expected.double(), actual.double()
    denominator = expected64.norm().item()
    numerator = (actual64 - expected64).norm().item()
    if denominator == 0.0:
        return numerator
    return numerator / denominator
