"""Accuracy of the low-bit sparse branch on a GPU: relative L2 of its output against bf16 SLA2.

Inputs: standard-normal q, k, v at video shapes, and q, k, v captured from every converted layer of
the embedded model (two timesteps, its default clip). Same routing and alpha for both outputs, so
the difference is the quantisation alone. Writes one CSV row per (input, mode).
Usage: python benchmarks/lowbit_accuracy.py --csv lowbit_accuracy.csv [--sparsity 0.97]
"""

from __future__ import annotations

import argparse
import csv

import torch
import triton

import sla2cli
from sla2cli.bench.environment import git_commit
from sla2cli.embedded.loading import embedded_example_inputs, load_embedded_model
from sla2cli.ops import num_blocks, route
from sla2cli.ops.attention import sla2_attention_routed
from sla2cli.ops.quantization import QUANT_INT8, QUANT_INT8_FP8, supported_quant_modes
from sla2cli.report.capture import find_sla2_layers
from sla2cli.training.calibration import capture_dense_calls

COLUMNS = ["source", "shape", "sparsity", "mode", "rel_l2_vs_bf16", "device", "torch", "triton", "commit"]


def random_inputs(shapes: list[str]):
    for spec in shapes:
        batch, heads, length, head_dim = (int(x) for x in spec.split(","))
        generator = torch.Generator(device="cuda").manual_seed(length)
        q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", generator=generator,
                               dtype=torch.bfloat16) for _ in range(3))
        yield f"random {spec}", q, k, v


def embedded_inputs(sparsity: float):
    model = load_embedded_model(device="cuda")
    sla2cli.convert(model, sparsity=sparsity)
    layers = find_sla2_layers(model)
    with torch.no_grad(), capture_dense_calls(layers) as calls:
        for timestep in (0.25, 0.75):
            model(**embedded_example_inputs(timestep=timestep, seed=1000, device="cuda"), return_dict=False)
    for name, layer_calls in calls.items():
        for index, call in enumerate(layer_calls):
            yield f"embedded {name} call {index}", *(t.to(torch.bfloat16) for t in (call.q, call.k, call.v))


def relative_errors(q, k, v, sparsity, modes):
    routing = route(q, k, sparsity=sparsity)
    alpha = torch.full((*q.shape[:2], num_blocks(q.shape[2], 128)), 0.9, device="cuda")
    with torch.no_grad():
        exact = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha).float()
        for mode in modes:
            low = sla2_attention_routed(q, k, v, routing.lut, alpha=alpha, quant=mode).float()
            yield mode, ((low - exact).norm() / exact.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--shapes", nargs="+", default=["1,12,32760,128", "2,4,8192,64"])
    args = parser.parse_args()
    modes = [m for m in (QUANT_INT8_FP8, QUANT_INT8) if m in supported_quant_modes("cuda")]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit())
    rows = []
    sources = list(random_inputs(args.shapes)) + list(embedded_inputs(args.sparsity))
    for source, q, k, v in sources:
        for mode, error in relative_errors(q, k, v, args.sparsity, modes):
            rows.append(dict(source=source, shape="x".join(map(str, q.shape)), sparsity=args.sparsity, mode=mode,
                             rel_l2_vs_bf16=round(error, 5), **meta))
            print(f"{source:55s} {mode:10s} {error:.4f}")
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for mode in modes:
        errors = [r["rel_l2_vs_bf16"] for r in rows if r["mode"] == mode]
        print(f"{mode}: max {max(errors):.4f} mean {sum(errors) / len(errors):.4f} over {len(errors)} inputs")


if __name__ == "__main__":
    main()
