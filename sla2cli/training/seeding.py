"""Randomness derived from (seed, purpose, step or sample index) instead of one stateful generator.

Why: a sample's clip, noise and timestep then depend only on its global index, not on how many
processes share the batch or whether the run was resumed, so one process and several draw exactly
the same samples at the same global batch, and resuming needs nothing but the step.
"""

from __future__ import annotations

import hashlib

import torch

STREAM_CLIP = 1  # which procedural clip a sample is
STREAM_NOISE = 2  # its noise and timestep
STREAM_ORDER = 3  # the order of an on-disk data set in one epoch

_SEED_MASK = (1 << 63) - 1


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every machine and Python version (blake2b of the parts)."""
    digest = hashlib.blake2b(",".join(str(int(part)) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def generator_for(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with derived_seed(*parts)."""
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))
