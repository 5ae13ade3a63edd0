"""Whole-model timing on one GPU: one transformer forward with FlashAttention2 vs SLA2, same weights.

Builds the recipe's full-size architecture with random weights (no download), times a forward
with the model's own attention under the SDPA flash backend, converts it in place to SLA2 and
times again on the same inputs. Appends rows to a CSV with device, versions and commit.
Usage: python benchmarks/model_suite.py --csv model.csv [--recipe wan2.1-t2v-1.3b] [--sparsity 0.97]
"""

from __future__ import annotations

import argparse
import csv

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import sla2cli
from sla2cli.bench.environment import git_commit
from sla2cli.sources.random_models import build_random_model, example_inputs


def median_ms(fn, rep_ms: int = 2000) -> float:
    return float(triton.testing.do_bench(fn, warmup=200, rep=rep_ms, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--recipe", default="wan2.1-t2v-1.3b")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for both runs")
    args = parser.parse_args()
    model = build_random_model(args.recipe, dtype=torch.bfloat16, device="cuda")
    inputs = example_inputs(args.recipe, args.resolution, frames=args.frames, dtype=torch.bfloat16, device="cuda")
    tokens = inputs["hidden_states"].shape
    def runner():
        return torch.compile(model) if args.compile else model

    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense = runner()
            dense_out = dense(**inputs, return_dict=False)[0]
            dense_ms = median_ms(lambda: dense(**inputs, return_dict=False))
        sla2cli.convert(model, sparsity=args.sparsity)
        torch._dynamo.reset()
        sparse = runner()
        sla2_out = sparse(**inputs, return_dict=False)[0]
        sla2_ms = median_ms(lambda: sparse(**inputs, return_dict=False))
    rel = ((sla2_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit())
    mode = "fwd-compiled" if args.compile else "fwd"
    rows = [
        dict(provider="fa2", model=args.recipe, latents=str(tuple(tokens)), sparsity="", mode=mode,
             median_ms=dense_ms, speedup_vs_fa2=1.0, rel_l2_vs_dense=0.0),
        dict(provider="sla2", model=args.recipe, latents=str(tuple(tokens)), sparsity=args.sparsity, mode=mode,
             median_ms=sla2_ms, speedup_vs_fa2=dense_ms / sla2_ms, rel_l2_vs_dense=rel),
    ]
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], *meta])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})
    for row in rows:
        print(f"{row['provider']:6s} {row['mode']} {row['model']} {row['latents']} s={row['sparsity']} "
              f"{row['median_ms']:.1f} ms  x{row['speedup_vs_fa2']:.2f}  rel_l2_vs_dense={row['rel_l2_vs_dense']:.3f}")
    print(meta)


if __name__ == "__main__":
    main()
