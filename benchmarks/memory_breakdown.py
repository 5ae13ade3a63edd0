"""Fine-tuning memory of a model too large for one GPU, measured on copies of it with fewer blocks.

For each depth n of --layers: the recipe's architecture with its first n transformer blocks (random weights,
built in bf16 on the GPU), converted to SLA2 at --sparsity and fine-tuned by `sla2cli.finetune` for --steps
steps (batch 1, gradient checkpointing, float32 master weights, AdamW) on random latents of --latents. Each row
records the peak GPU memory and the parameter count, and splits the peak into the training state (16 bytes
per parameter: float32 weights, gradients and AdamW's two moments) and the rest (activations, bf16 copies
under autocast, workspaces).

Every block adds the same weights, state and checkpointed input, so peak memory is a line in depth: a
least-squares line through the measured depths gives one block's cost and the rest. The `extrapolated` rows
carry it to the recipe's full depth on one GPU, and to N GPUs under FSDP2 as an estimate: the training state
divided by N, plus the unsharded rest, plus two blocks gathered in float32 at a time (the current one and the
next). They are estimates, marked so in the CSV; only `measured` rows were run.
Usage: python benchmarks/memory_breakdown.py --recipe wan2.1-t2v-14b --latents 16,21,90,160 --layers 1 2 4 \\
           --csv memory.csv
A CPU check at tiny sizes: ... --device cpu --scaled-down --latents 16,2,16,16 --text 16,32 --layers 1 2 --steps 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from finetune_gpu import environment, parse_clip_like, reset_peak, write_random_latents

import sla2cli
from sla2cli.files import write_csv_file
from sla2cli.integration.recipes import get_recipe
from sla2cli.sources.random_models import build_random_model

TRAINING_STATE_BYTES = 16  # per parameter: float32 weight, float32 gradient, AdamW exp_avg and exp_avg_sq
GATHERED_BLOCKS = 2  # FSDP2 holds the running block and prefetches the next one, unsharded
GIB = 2**30
COLUMNS = ["kind", "recipe", "layers", "gpus", "latents", "sparsity", "steps", "parameters", "peak_gb",
           "training_state_gb", "rest_gb", "seconds_per_step", "gpu_capacity_gb", "note", "device", "torch", "triton",
           "commit"]


def measure(recipe: str, layers: int, data: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """One fine-tuning run of the recipe's architecture cut to `layers` blocks: peak memory and its split."""
    model = build_random_model(recipe, dtype=torch.bfloat16, device=device, full_size=not args.scaled_down,
                               num_layers=layers)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    sla2cli.convert(model, sparsity=args.sparsity)
    reset_peak(device)
    summary = sla2cli.finetune(model, data, steps=args.steps, batch_size=1, gradient_checkpointing=True,
                               validation_samples=1, warmup_steps=1, device=device, recipe=recipe)
    del model
    peak_gb = summary.peak_memory_mb / 1024
    state_gb = parameters * TRAINING_STATE_BYTES / GIB
    return {"kind": "measured", "layers": layers, "gpus": 1, "parameters": parameters, "peak_gb": peak_gb,
            "training_state_gb": state_gb, "rest_gb": peak_gb - state_gb,
            "seconds_per_step": summary.seconds / max(summary.steps, 1)}


def line_through(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points (two or more distinct x)."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


def extrapolate(measured: list[dict], full_depth: int, gpu_counts: list[int], capacity_gb: float) -> list[dict]:
    """The full depth on one GPU from the fitted lines, then FSDP2 estimates for each GPU count."""
    peak = line_through([(row["layers"], row["peak_gb"]) for row in measured])
    params = line_through([(row["layers"], row["parameters"]) for row in measured])
    parameters = round(params[0] + params[1] * full_depth)
    peak_gb = peak[0] + peak[1] * full_depth
    state_gb = parameters * TRAINING_STATE_BYTES / GIB
    rest_gb = peak_gb - state_gb
    block_gb = params[1] * 4 / GIB  # one block's float32 weights
    rows = []
    for gpus in [1, *gpu_counts]:
        sharded = gpus > 1
        per_gpu = state_gb / gpus + rest_gb + (GATHERED_BLOCKS * block_gb if sharded else 0.0)
        note = (f"line through {len(measured)} depths: {peak[1]:.2f} GB per block + {peak[0]:.2f} GB"
                + (f"; FSDP2 estimate: state / {gpus} + rest + {GATHERED_BLOCKS} gathered blocks" if sharded else ""))
        rows.append({"kind": "extrapolated", "layers": full_depth, "gpus": gpus, "parameters": parameters,
                     "peak_gb": per_gpu, "training_state_gb": state_gb / gpus, "rest_gb": rest_gb,
                     "gpu_capacity_gb": capacity_gb, "note": note})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="wan2.1-t2v-14b")
    parser.add_argument("--latents", default="16,21,90,160", help="C,T,H,W (default: 720p x 81 frames)")
    parser.add_argument("--text", default="512,4096", help="tokens,width of the prompt embeddings")
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4], help="depths to measure (two or more)")
    parser.add_argument("--gpus", nargs="+", type=int, default=[2, 4, 8], help="GPU counts to estimate")
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, help="folder for the random latents (default: a temporary one)")
    parser.add_argument("--scaled-down", action="store_true", help="small widths (for a CPU check)")
    parser.add_argument("--csv", required=True)
    args = parser.parse_args()
    if len(set(args.layers)) < 2:
        parser.error("--layers needs two or more different depths to fit a line")
    with tempfile.TemporaryDirectory() as scratch:
        run(args, Path(args.work or scratch))


def run(args: argparse.Namespace, work: Path) -> None:
    """Measure each depth (rewriting the CSV after each), then add the extrapolated rows."""
    device = torch.device(args.device)
    latents, text = parse_clip_like(args.latents, 4), parse_clip_like(args.text, 2)
    data = write_random_latents(work / "random-latents", latents, text)
    full_depth = get_recipe(args.recipe).model_config()["num_layers"]
    capacity_gb = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0.0
    shared = {"recipe": args.recipe, "latents": "x".join(map(str, latents)), "sparsity": args.sparsity,
              "steps": args.steps, **environment(device)}
    started = time.perf_counter()
    measured = []
    for layers in args.layers:  # the CSV is rewritten after each depth: a run cut short keeps what it measured
        measured.append(measure(args.recipe, layers, data, args, device))
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in measured[-1].items()},
              flush=True)
        write_csv_file(args.csv, COLUMNS, [{**shared, **row} for row in measured])
    rows = measured + extrapolate(measured, full_depth, args.gpus, capacity_gb)
    write_csv_file(args.csv, COLUMNS, [{**shared, **row} for row in rows])
    for row in rows[len(measured):]:
        print(f"{row['layers']} layers on {row['gpus']} GPU(s): {row['peak_gb']:.1f} GB per GPU "
              f"(state {row['training_state_gb']:.1f}, rest {row['rest_gb']:.1f}; capacity {capacity_gb:.0f})")
    print(f"{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
