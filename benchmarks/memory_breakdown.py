"""Fine-tuning memory of a model too large for one GPU, measured on copies of it with fewer blocks.

For each depth n of --layers: the recipe's architecture with its first n transformer blocks (random weights,
built in bf16 on the GPU), converted to SLA2 at --sparsity and fine-tuned by `sla2cli.finetune` for --steps
steps (batch 1, gradient checkpointing, float32 master weights, AdamW) on random latents of --latents. Each row
records the peak GPU memory and the parameter count, and splits the peak into the training state (16 bytes
per parameter: float32 weights, gradients and AdamW's two moments) and the rest (activations, bf16 copies
under autocast, workspaces).

Every block adds the same weights, state and checkpointed input, so each quantity is a line in depth; lines
through the measured depths carry them to the recipe's full depth. A step's memory is bounded by two moments:
the start of the backward (weights and AdamW moments, 12 bytes per parameter, plus every block's checkpointed
input, measured as what a training forward leaves allocated) and its end (all gradients too, 16 bytes per
parameter); either comes with one block's working memory (the measured peak less the training state). The
`extrapolated` rows give that bound at full depth on one GPU and, as an estimate, on N GPUs under FSDP2: weights,
gradients and moments divided by N, checkpointed inputs and working memory not, two blocks gathered in float32
at a time. They are estimates, marked so in the CSV; only `measured` rows were run. Three steps of a model that
fits one GPU check them (benchmarks/finetune_gpu.py --phases wan, the whole Wan2.1-1.3B at 480p).
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
WEIGHT_AND_MOMENT_BYTES = 12  # the same without the gradient (before the backward has made it)
GATHERED_BLOCKS = 2  # FSDP2 holds the running block and prefetches the next one, unsharded
GIB = 2**30
COLUMNS = ["kind", "recipe", "layers", "gpus", "latents", "sparsity", "steps", "parameters", "peak_gb",
           "training_state_gb", "rest_gb", "forward_held_gb", "seconds_per_step", "gpu_capacity_gb", "note",
           "device", "torch", "triton", "commit"]


class ForwardHeld:
    """The most memory a training forward (grad enabled) leaves allocated for its backward: allocated after the
    model's forward minus before it. With gradient checkpointing that is each block's saved input."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.most_bytes = 0
        self._before = 0
        self._measures = device.type == "cuda"
        model.register_forward_pre_hook(self._before_forward)
        model.register_forward_hook(self._after_forward)

    def _before_forward(self, *_):
        if self._measures and torch.is_grad_enabled():
            self._before = torch.cuda.memory_allocated()

    def _after_forward(self, *_):
        if self._measures and torch.is_grad_enabled():
            self.most_bytes = max(self.most_bytes, torch.cuda.memory_allocated() - self._before)


def measure(recipe: str, layers: int, data: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """One fine-tuning run of the recipe's architecture cut to `layers` blocks: peak memory and its split."""
    model = build_random_model(recipe, dtype=torch.bfloat16, device=device, full_size=not args.scaled_down,
                               num_layers=layers)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    sla2cli.convert(model, sparsity=args.sparsity)
    held = ForwardHeld(model, device)
    reset_peak(device)
    summary = sla2cli.finetune(model, data, steps=args.steps, batch_size=1, gradient_checkpointing=True,
                               validation_samples=1, warmup_steps=1, device=device, recipe=recipe)
    del model
    peak_gb = summary.peak_memory_mb / 1024
    state_gb = parameters * TRAINING_STATE_BYTES / GIB
    return {"kind": "measured", "layers": layers, "gpus": 1, "parameters": parameters, "peak_gb": peak_gb,
            "training_state_gb": state_gb, "rest_gb": peak_gb - state_gb, "forward_held_gb": held.most_bytes / GIB,
            "seconds_per_step": summary.seconds / max(summary.steps, 1)}


def line_through(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points (two or more distinct x)."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


def at_depth(measured: list[dict], key: str, depth: int) -> float:
    """The least-squares line of `key` against depth, evaluated at `depth`."""
    intercept, slope = line_through([(row["layers"], row[key]) for row in measured])
    return intercept + slope * depth


def extrapolate(measured: list[dict], full_depth: int, gpu_counts: list[int], capacity_gb: float) -> list[dict]:
    """The full depth on one GPU, then FSDP2 estimates for each GPU count, from lines through the measured depths.

    Two moments bound a step's memory: the start of the backward (weights and AdamW moments, 12 B per parameter,
    sharded; every block's checkpointed input, not sharded) and its end (all gradients too, 16 B per parameter).
    Either comes with the working memory of one block (`rest`: the measured peak less the training state)."""
    parameters = round(at_depth(measured, "parameters", full_depth))
    _, block_parameters = line_through([(row["layers"], row["parameters"]) for row in measured])
    held_gb = at_depth(measured, "forward_held_gb", full_depth)
    rest_gb = at_depth(measured, "rest_gb", full_depth)
    rows = []
    for gpus in [1, *gpu_counts]:
        end_of_backward = parameters * TRAINING_STATE_BYTES / GIB / gpus
        start_of_backward = parameters * WEIGHT_AND_MOMENT_BYTES / GIB / gpus + held_gb
        gathered_gb = GATHERED_BLOCKS * block_parameters * 4 / GIB if gpus > 1 else 0.0
        rows.append({"kind": "extrapolated", "layers": full_depth, "gpus": gpus, "parameters": parameters,
                     "peak_gb": max(end_of_backward, start_of_backward) + rest_gb + gathered_gb,
                     "training_state_gb": end_of_backward, "rest_gb": rest_gb, "forward_held_gb": held_gb,
                     "gpu_capacity_gb": capacity_gb,
                     "note": ("start" if start_of_backward > end_of_backward else "end") + " of the backward bounds it"
                             + (f"; FSDP2: state / {gpus}, {GATHERED_BLOCKS} blocks gathered" if gpus > 1 else "")})
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
        print(f"{row['layers']} layers on {row['gpus']} GPU(s): {row['peak_gb']:.1f} GB per GPU (state "
              f"{row['training_state_gb']:.1f}, checkpointed inputs {row['forward_held_gb']:.1f}, "
              f"rest {row['rest_gb']:.1f}; {row['note']}; capacity {capacity_gb:.0f})")
    print(f"{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
