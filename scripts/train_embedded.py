"""Train the embedded default model: `python scripts/train_embedded.py --out sla2cli/assets/ --device cuda`.

A thin command line over `sla2cli.embedded.train`; see that module for the recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import sla2cli  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sla2cli.embedded.train import TrainSettings, train_embedded_model  # noqa: E402
from sla2cli.errors import UserError  # noqa: E402


def parse_arguments(argv: list[str] | None) -> tuple[TrainSettings, bool]:
    """Command-line options -> (TrainSettings, whether to show progress); defaults are the shipped recipe."""
    defaults = TrainSettings(out_dir=Path("."))
    parser = argparse.ArgumentParser(description="Train the embedded Wan-architecture video model on procedural clips.")
    parser.add_argument("--out", type=Path, required=True, help="folder for embedded_wan.safetensors and .json")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="most optimiser steps to take")
    parser.add_argument(
        "--minutes", type=float, default=defaults.minutes, help="time budget; training stops when it is spent"
    )
    parser.add_argument("--device", default=defaults.device, help="torch device, e.g. cuda or cpu")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="clips per step")
    parser.add_argument("--frames", type=int, default=defaults.frames, help="latent frames per training clip")
    parser.add_argument("--height", type=int, default=defaults.height, help="latent height (even)")
    parser.add_argument("--width", type=int, default=defaults.width, help="latent width (even)")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    parser.add_argument(
        "--qk-gain", type=float, default=defaults.qk_gain, help="initial attention logit scale (q/k norm gains)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for initialisation and clips")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    arguments = parser.parse_args(argv)
    settings = TrainSettings(
        out_dir=arguments.out,
        steps=arguments.steps,
        minutes=arguments.minutes,
        batch_size=arguments.batch_size,
        frames=arguments.frames,
        height=arguments.height,
        width=arguments.width,
        learning_rate=arguments.lr,
        warmup_steps=arguments.warmup_steps,
        qk_gain=arguments.qk_gain,
        seed=arguments.seed,
        device=arguments.device,
    )
    return settings, not arguments.quiet


def main(argv: list[str] | None = None) -> int:
    """Train, print a one-paragraph summary, return the exit code (2 for a user mistake)."""
    try:
        settings, show_progress = parse_arguments(argv)
        summary = train_embedded_model(settings, show_progress=show_progress)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"steps {summary.steps_done} in {summary.seconds:.0f} s; train loss {summary.first_loss:.4f} -> "
        f"{summary.final_loss:.4f}; validation loss {summary.validation_loss_before:.4f} -> "
        f"{summary.validation_loss_after:.4f}; wrote {summary.weights_path} and {summary.config_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
