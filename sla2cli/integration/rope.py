"""Rotary position embeddings as the supported families apply them, on (B, L, H, D) tensors.

Both rotate consecutive feature pairs (x_2i, x_2i+1) by an angle per position and pair; they differ in
how the angle tables are laid out. The arithmetic follows each family's own dtype promotion (angles
often float64 or float32, activations bf16) so that the converted model reproduces the dense one.
"""

from __future__ import annotations

import torch


def rotate_pairs_wan(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan: tables of shape (1, L, 1, D) with each pair's angle repeated; even entries give cos, odd sin."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def rotate_pairs_cogvideox(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """CogVideoX: tables of shape (L, D), computed in float32: x * cos + (-x_odd, x_even) * sin."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    cos = freqs_cos.to(x.device)[None, :, None, :]
    sin = freqs_sin.to(x.device)[None, :, None, :]
    return (x.float() * cos + turned.float() * sin).to(x.dtype)
