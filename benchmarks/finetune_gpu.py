"""`sla2 finetune` on one GPU: the embedded model's default recipe, QAT, and a full-size Wan2.1-1.3B step.

Phases (each adds rows to OUT/finetune_gpu.csv (--csv), with device, torch/triton versions and commit):
  embedded  the embedded model converted at 0.97 (`sla2 convert`), fine-tuned with the command and the
            recipe's defaults (2000 steps, batch 8, lr 3e-4): validation loss of the dense model, before and
            after, minutes, samples/s, peak memory; the result is also evaluated with the int8 sparse branch.
  qat       the same run with --quant int8, evaluated with int8 (and without): QAT must be no worse under int8
            than the plain run evaluated with int8.
  wan       a Wan2.1-1.3B-architecture model (random weights, built on the GPU in bf16), 480p x 81 frames
            (latents 16x21x60x104, text 512x4096, random), converted at 0.97, 3 fine-tuning steps with gradient
            checkpointing through `sla2cli.finetune`: samples/s and peak memory.
About 8 minutes on one H200 (benchmarks/gpu_run.sh runs them as two phases of about 4). Tiny sizes for a CPU check:
  python benchmarks/finetune_gpu.py --out /tmp/ft --device cpu --steps 2 --clip 2,16,16 --validation-samples 1 \
      --wan-scaled-down --wan-latents 16,2,16,16 --wan-text 16,32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

import sla2cli
from sla2cli.bench.environment import git_commit, triton_version
from sla2cli.cli import main as sla2_main
from sla2cli.files import write_csv_file
from sla2cli.sources.random_models import build_random_model
from sla2cli.training.job import FinetuneRequest, run_finetune_job
from sla2cli.training.latent_format import latent_folder_writer
from sla2cli.training.settings import parse_clip

COLUMNS = ["phase", "model", "sparsity", "train_quant", "eval_quant", "steps", "batch_size", "clip",
           "dense_val_loss", "val_loss_before", "val_loss_after", "minutes", "samples_per_second",
           "peak_memory_gb", "device", "torch", "triton", "commit"]


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version(), "commit": git_commit()}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_command(checkpoint: Path, out: Path, args: argparse.Namespace, device: torch.device, quant: str | None):
    """`sla2 finetune` with the recipe's defaults (steps and clip only when given), in this process."""
    overrides = {"steps": args.steps, "clip": parse_clip(args.clip) if args.clip else None, "quant": quant,
                 "validation_samples": args.validation_samples}
    request = FinetuneRequest(checkpoint=checkpoint, out=out, overrides=overrides, device=device, overwrite=True)
    return run_finetune_job(request, Console()).summary


def evaluate_with(folder: Path, quant: str, args: argparse.Namespace, device: torch.device) -> float:
    model = sla2cli.load(folder, quant=quant, dtype=torch.float32, device=device)
    clip = parse_clip(args.clip) if args.clip else None
    return sla2cli.evaluate(model, clip=clip, validation_samples=args.validation_samples)


def embedded_rows(args: argparse.Namespace, device: torch.device, phases: list[str]) -> list[dict]:
    checkpoint = args.out / "embedded-sla2"
    if not checkpoint.is_dir():
        sla2_main_checked(["convert", "--out", str(checkpoint)])
    rows = []
    for phase, quant in (("embedded", None), ("qat", "int8")):
        if phase not in phases:
            continue
        reset_peak(device)
        out = args.out / f"embedded-sla2-ft-{phase}"
        summary = run_command(checkpoint, out, args, device, quant)
        base = {"phase": phase, "model": "embedded", "sparsity": 0.97, "steps": summary.steps,
                "batch_size": summary.settings.batch_size, "clip": "x".join(map(str, summary.settings.clip)),
                "dense_val_loss": summary.dense_validation, "val_loss_before": summary.validation_before,
                "minutes": summary.seconds / 60, "samples_per_second": summary.samples_per_second,
                "peak_memory_gb": summary.peak_memory_mb / 1024, "train_quant": quant or "none"}
        rows.append({**base, "eval_quant": "none" if quant is None else "int8", "val_loss_after":
                     summary.validation_after})
        other = "int8" if quant is None else "none"
        rows.append({**base, "eval_quant": other, "val_loss_after": evaluate_with(out, other, args, device)})
    return rows


def sla2_main_checked(argv: list[str]) -> None:
    try:
        sla2_main(argv)
    except SystemExit as done:
        if done.code:
            raise


def wan_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Three steps of the full-size Wan2.1-1.3B architecture on random latents (the timing, not the loss)."""
    latents, text = parse_clip_like(args.wan_latents, 4), parse_clip_like(args.wan_text, 2)
    data = write_random_latents(args.out / "wan-random-latents", latents, text)
    model = build_random_model("wan2.1-t2v-1.3b", dtype=torch.bfloat16, device=device,
                               full_size=not args.wan_scaled_down)
    sla2cli.convert(model, sparsity=0.97)
    reset_peak(device)
    summary = sla2cli.finetune(model, data, steps=args.wan_steps, batch_size=1, gradient_checkpointing=True,
                               validation_samples=1, warmup_steps=1, device=device, recipe="wan2.1-t2v-1.3b")
    return [{"phase": "wan", "model": "wan2.1-t2v-1.3b (random weights)" + (" scaled down" if args.wan_scaled_down
                                                                          else ""),
             "sparsity": 0.97, "train_quant": "none", "eval_quant": "none", "steps": summary.steps,
             "batch_size": 1, "clip": "x".join(map(str, latents)), "dense_val_loss": summary.dense_validation,
             "val_loss_before": summary.validation_before, "val_loss_after": summary.validation_after,
             "minutes": summary.seconds / 60, "samples_per_second": summary.samples_per_second,
             "peak_memory_gb": summary.peak_memory_mb / 1024}]


def write_random_latents(folder: Path, latents: tuple[int, ...], text: tuple[int, ...]) -> Path:
    """A latent data folder of two random samples (one for training, one for validation): timing, not learning."""
    generator = torch.Generator().manual_seed(0)
    with latent_folder_writer(folder, overwrite=True) as writer:
        for index in range(2):
            writer.add(f"random-{index}", torch.randn(latents, generator=generator),
                       torch.randn(text, generator=generator))
        writer.finish(validation=["random-1"])
    return folder


def parse_clip_like(text: str, count: int) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != count:
        raise SystemExit(f"expected {count} comma-separated sizes, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and finetune_gpu.csv")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--phases", default="embedded,qat,wan", help="comma-separated: embedded, qat, wan")
    parser.add_argument("--csv", default="finetune_gpu.csv", help="file name of the results under --out")
    parser.add_argument("--steps", type=int, help="embedded runs: steps (default: the recipe's 2000)")
    parser.add_argument("--clip", help="embedded runs: FRAMES,HEIGHT,WIDTH (default: the model's 8,64,64)")
    parser.add_argument("--validation-samples", type=int, help="embedded runs (default: the recipe's 8)")
    parser.add_argument("--wan-latents", default="16,21,60,104", help="C,T,H,W (480p x 81 frames)")
    parser.add_argument("--wan-text", default="512,4096", help="tokens,width of the prompt embeddings")
    parser.add_argument("--wan-steps", type=int, default=3)
    parser.add_argument("--wan-scaled-down", action="store_true", help="2-layer Wan (for a CPU check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    phases = [phase.strip() for phase in args.phases.split(",")]
    started = time.perf_counter()
    meta = environment(device)
    rows: list[dict] = []
    for phase in phases:  # the CSV is rewritten after each phase, so a run cut short keeps what it measured
        rows += wan_rows(args, device) if phase == "wan" else embedded_rows(args, device, [phase])
        write_rows(args.out / args.csv, rows, meta)
    for row in rows:
        print(", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in row.items() if value is not None))
    print(f"{meta}; {(time.perf_counter() - started) / 60:.1f} min in all")


def write_rows(path: Path, rows: list[dict], meta: dict) -> None:
    write_csv_file(path, COLUMNS, [{**row, **meta} for row in rows])


if __name__ == "__main__":
    main()
