"""A synthetic video-like attention pattern: Q, K, V from smooth random fields over a (frames, rows, columns)
token grid, so that, as in a video diffusion transformer, each token attends mostly to its neighbours in
space and time and thinly to everything else. No model download and no GPU.
"""

from __future__ import annotations

import math

import torch

GRID_SIDE = 32  # tokens per row and rows per frame: a 1024-token frame, like a small latent video


def grid_positions(tokens: int) -> torch.Tensor:
    """(tokens, 3) float positions (frame, row, column) in raster order; the last frame may be partial."""
    frames = math.ceil(tokens / (GRID_SIDE * GRID_SIDE))
    t, y, x = torch.meshgrid(
        torch.arange(frames), torch.arange(GRID_SIDE), torch.arange(GRID_SIDE), indexing="ij"
    )
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)[:tokens].float()


def smooth_field(
    positions: torch.Tensor, scales: torch.Tensor, features: int, gen: torch.Generator
) -> torch.Tensor:
    """Random Fourier features: f(p) . f(p') ~ exp(-|(p - p') / scales|^2 / 2), unit norm per token."""
    frequencies = torch.randn(3, features, generator=gen) / scales[:, None]
    phases = torch.rand(features, generator=gen) * 2 * math.pi
    return math.sqrt(2.0 / features) * torch.cos(positions @ frequencies + phases)


def video_like_qkv(
    tokens: int, heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (1, H, L, D) float32 with local spatio-temporal attention plus noise.

    q . k / sqrt(D) ~ sharpness * exp(-distance^2 / 2), so attention peaks on nearby tokens of nearby
    frames and spreads the rest thinly. Each head draws its own reach in frames and in tokens and its
    own sharpness; K carries a shared offset (as real keys do), which the router's smoothing removes.
    """
    gen = torch.Generator().manual_seed(seed)
    positions = grid_positions(tokens)
    low, span = torch.tensor([0.5, 1.5, 10.0]), torch.tensor([1.0, 1.5, 10.0])
    qs, ks, vs = [], [], []
    for _ in range(heads):
        frame_reach, grid_reach, sharpness = (low + span * torch.rand(3, generator=gen)).tolist()
        reach = torch.tensor([frame_reach, grid_reach, grid_reach])
        field = smooth_field(positions, reach, head_dim, gen)
        jitter = 0.3 / math.sqrt(head_dim)
        q = field + jitter * torch.randn(tokens, head_dim, generator=gen)
        k = field + jitter * torch.randn(tokens, head_dim, generator=gen)
        v = smooth_field(positions, reach * 2, head_dim, gen) * math.sqrt(head_dim)
        qs.append(q * sharpness * math.sqrt(head_dim))
        ks.append(k + 0.5 * torch.randn(head_dim, generator=gen))
        vs.append(v + 0.3 * torch.randn(tokens, head_dim, generator=gen))
    return torch.stack(qs)[None], torch.stack(ks)[None], torch.stack(vs)[None]
