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


def rel_l2(actual: torch.Tensor | None, expected: torch.Tensor | None, floor: float = 0.0) -> float:
    """‖a − e‖ / max(‖e‖, floor) in float64; a missing gradient counts as zeros.

    `floor` keeps a gradient that is analytically ~0 (e.g. the softmax over a one-token block)
    from turning rounding noise into a huge relative error; gradient checks pass 5% of
    ‖grad_out‖, the scale every gradient is linear in.
    """
    if expected is None and actual is None:
        return 0.0
    if expected is None:
        expected = torch.zeros_like(actual)
    if actual is None:
        actual = torch.zeros_like(expected)
    expected64, actual64 = expected.double(), actual.double()
    denominator = max(expected64.norm().item(), floor)
    numerator = (actual64 - expected64).norm().item()
    if denominator == 0.0:
        return numerator
    return numerator / denominator


def force_tensor_descriptors(monkeypatch, head_dim: int) -> None:
    """Every kernel at this head dim gathers its blocks of rows through tensor descriptors (Launch.tma), the
    forward at any launch size (no MIN_DESCRIPTOR_PAIRS gate)."""
    from sla2_kernels import backward, forward

    key = (head_dim, forward.CODE_OFF)
    monkeypatch.setitem(forward.FORWARD_LAUNCH, key, forward.FORWARD_LAUNCH[key]._replace(tma=True))
    monkeypatch.setattr(forward, "MIN_DESCRIPTOR_PAIRS", 0)
    monkeypatch.setitem(backward.QUERY_LAUNCH, head_dim, backward.QUERY_LAUNCH[head_dim]._replace(tma=True))
    monkeypatch.setitem(backward.KEY_LAUNCH, head_dim, backward.KEY_LAUNCH[head_dim]._replace(tma=True))
