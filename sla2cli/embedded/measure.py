"""Measure how structured the embedded model's attention is on its validation clips.

`python -m sla2cli.embedded.measure --clips 4 --device cuda` prints, as json, the share of
softmax mass that the top 10% of key blocks hold per query block, for every layer and head, and its mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sla2cli.devices import resolve_device
from sla2cli.embedded.attention_stats import attention_block_mass_stats
from sla2cli.embedded.config import DEFAULT_CLIP
from sla2cli.embedded.loading import load_embedded_model
from sla2cli.embedded.synthetic import validation_clips
from sla2cli.errors import UserError


def measure(
    clips: int,
    size: tuple[int, int, int],
    top_fraction: float,
    timesteps: tuple[float, ...],
    device: str,
    assets_dir: Path | None,
) -> dict:
    """Load the shipped (or given) weights and return the attention-structure report as a dict."""
    if clips < 1:
        raise UserError("--clips must be at least 1")
    model = load_embedded_model(device=resolve_device(device), assets_dir=assets_dir)
    start = time.monotonic()
    stats = attention_block_mass_stats(
        model, validation_clips(clips, size), top_fraction=top_fraction, timesteps=timesteps
    )
    return {
        "tokens": stats.tokens,
        "key_blocks": stats.key_blocks,
        "top_fraction": top_fraction,
        "top_blocks": stats.top_blocks,
        "clips": clips,
        "timesteps": list(timesteps),
        "mean_top_block_mass_share": round(stats.mean, 4),
        "per_layer_head": [[round(value, 4) for value in row] for row in stats.per_layer_head.tolist()],
        "seconds": round(time.monotonic() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: print the report as json; exit 2 on a user mistake."""
    parser = argparse.ArgumentParser(description="Attention structure of the embedded model on validation clips.")
    parser.add_argument("--clips", type=int, default=4, help="number of validation clips")
    parser.add_argument("--frames", type=int, default=DEFAULT_CLIP["frames"], help="latent frames per clip")
    parser.add_argument("--height", type=int, default=DEFAULT_CLIP["height"], help="latent height")
    parser.add_argument("--width", type=int, default=DEFAULT_CLIP["width"], help="latent width")
    parser.add_argument("--top-fraction", type=float, default=0.1, help="share of key blocks counted as top")
    parser.add_argument(
        "--timesteps", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="noise levels t in [0, 1]"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--assets", type=Path, default=None, help="folder with embedded_wan.* (default: shipped)")
    arguments = parser.parse_args(argv)
    try:
        report = measure(
            arguments.clips,
            (arguments.frames, arguments.height, arguments.width),
            arguments.top_fraction,
            tuple(arguments.timesteps),
            arguments.device,
            arguments.assets,
        )
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
