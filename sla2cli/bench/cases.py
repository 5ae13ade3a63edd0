"""What one benchmark measures: attention shapes, sparsities and modes, parsed from the command line.

Kept apart from the runners so that every option is checked once, up front, with a one-line message,
before any tensor is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

from sla2cli.errors import UserError
from sla2cli.ops.validation import check_head_dim

FORWARD = "fwd"
FORWARD_BACKWARD = "fwd+bwd"
MODES = (FORWARD, FORWARD_BACKWARD)



@dataclass(frozen=True)
class AttentionShape:
    """(B, H, L, D) of one self-attention call."""

    batch: int
    heads: int
    length: int
    head_dim: int

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.length, self.head_dim)

    @property
    def label(self) -> str:
        """Machine-friendly name, e.g. 1x12x32760x128 (no commas, so CSV cells need no quoting)."""
        return "x".join(str(d) for d in self.dims)


# Wan2.1-1.3B at 480p x 81 frames and Wan2.1-14B at 720p x 81 frames.
GPU_DEFAULT_SHAPES = (AttentionShape(1, 12, 32760, 128), AttentionShape(1, 40, 75600, 128))
# Small enough for the CPU block-gather path to finish in seconds.
CPU_DEFAULT_SHAPES = (AttentionShape(1, 2, 2048, 64), AttentionShape(1, 2, 4096, 128))


def parse_shape(text: str) -> AttentionShape:
    """'B,H,L,D' -> AttentionShape; UserError on anything else."""
    parts = [p.strip() for p in text.split(",")]
    example = "e.g. --shape 1,12,32760,128"
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise UserError(f"--shape {text!r} is not B,H,L,D (four positive integers, {example})")
    batch, heads, length, head_dim = (int(p) for p in parts)
    if min(batch, heads, length, head_dim) < 1:
        raise UserError(f"--shape {text!r} has a zero dimension; every one of B,H,L,D must be >= 1")
    check_head_dim(head_dim, f"the head dim of --shape {text!r}")
    return AttentionShape(batch, heads, length, head_dim)


def check_mode(text: str) -> str:
    if text not in MODES:
        raise UserError(f"--mode {text!r} is unknown; use {' or '.join(MODES)}")
    return text


def unique(items: list) -> list:
    """Drop repeats, keep the user's order."""
    return list(dict.fromkeys(items))
