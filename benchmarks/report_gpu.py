"""`sla2 report` at full size on one GPU: Wan2.1-1.3B architecture (random weights), 480p, 81 frames.

Saves the converted random-weight model as a checkpoint, runs the report command on it in this
process and records the peak GPU memory it allocated (the report must stay under 40 GB).
Usage: python benchmarks/report_gpu.py --csv report.csv --summary report_memory.csv
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

import sla2cli
from sla2cli.bench.environment import git_commit
from sla2cli.cli import main as sla2_main
from sla2cli.sources.random_models import build_random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True, help="the report's own CSV (one row per layer and head)")
    parser.add_argument("--summary", required=True, help="one row: peak memory, time, settings")
    parser.add_argument("--timesteps", default="0.5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "wan13-random-sla2"
        model = build_random_model("wan2.1-t2v-1.3b", dtype=torch.bfloat16, device="cuda")
        sla2cli.convert(model, sparsity=0.97)
        sla2cli.save(model, checkpoint, include_base_weights=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            sla2_main(["report", str(checkpoint), "--resolution", "480p", "--timesteps", args.timesteps,
                       "--clips", "1", "--csv", args.csv, "--quiet"])
        except SystemExit as done:
            if done.code:
                raise
        seconds = time.perf_counter() - start
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    row = dict(command="sla2 report", model="wan2.1-t2v-1.3b (random weights)", resolution="480p x 81 frames",
               tokens=32760, timesteps=args.timesteps, sparsity=0.97, seconds=round(seconds, 1),
               peak_gpu_mem_gb=round(peak_gb, 2), device=torch.cuda.get_device_name(), torch=torch.__version__,
               commit=git_commit())
    with open(args.summary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    print(row)


if __name__ == "__main__":
    main()
