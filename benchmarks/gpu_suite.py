"""Operator timing on one GPU: SLA2 vs FlashAttention2 (torch SDPA flash backend), same process.

Prints a short table and writes a CSV (one row per measurement) with the device, torch/triton
versions and commit. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed).
Usage: python benchmarks/gpu_suite.py --csv results.csv [--shapes 1,12,32760,128 ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla2cli.ops import num_blocks, route, sla2_attention
from sla2cli.ops.geometry import LINEAR_EPS


def commit() -> str:
    env = os.environ.get("SLA2_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fn, rep_ms: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def median_graph_ms(fn) -> float:
    """Median of CUDA-graph replays: the GPU time of the op without Python launch overhead."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def dense_flops(batch, heads, length, head_dim, mode):
    forward = 4.0 * batch * heads * length * length * head_dim
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def run_shape(batch, heads, length, head_dim, sparsities, modes, rows, rep_ms):
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    grad = torch.randn_like(q)
    shape = f"{batch}x{heads}x{length}x{head_dim}"

    def fa2_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def record(provider, sparsity, mode, ms, k_share=1.0, note=""):
        rows.append(dict(provider=provider, shape=shape, sparsity=sparsity, mode=mode, median_ms=ms,
                         dense_tflops=dense_flops(batch, heads, length, head_dim, mode) / ms / 1e9,
                         sparse_tflops=dense_flops(batch, heads, length, head_dim, mode) * k_share / ms / 1e9,
                         note=note))

    fa2 = {}
    if "fwd" in modes:
        fa2["fwd"] = median_ms(fa2_fwd, rep_ms)
        record("fa2", "", "fwd", fa2["fwd"])
        fa2["fwd-graph"] = median_graph_ms(fa2_fwd)
        record("fa2", "", "fwd-graph", fa2["fwd-graph"], note="CUDA graph replay")
    if "fwd+bwd" in modes:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def fa2_train():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
            out.backward(grad)

        fa2["fwd+bwd"] = median_ms(fa2_train, rep_ms)
        record("fa2", "", "fwd+bwd", fa2["fwd+bwd"])

    num_q_blocks, num_k_blocks = num_blocks(length, 128), num_blocks(length, 64)
    alpha = torch.rand(batch, heads, num_q_blocks, device=device, generator=gen)
    for sparsity in sparsities:
        routing = route(q, k, sparsity=sparsity)
        share = routing.k_sel / num_k_blocks
        if "fwd" in modes:
            record("sla2", sparsity, "fwd", median_ms(lambda s=sparsity: sla2_attention(q, k, v, sparsity=s, alpha=alpha), rep_ms), share)
            record("sla2-routing", sparsity, "fwd", median_ms(lambda s=sparsity: route(q, k, sparsity=s), rep_ms), share)
            record("sla2", sparsity, "fwd-graph", median_graph_ms(
                lambda s=sparsity: sla2_attention(q, k, v, sparsity=s, alpha=alpha)), share,
                note="CUDA graph replay (no launch overhead)")
            from sla2_kernels import block_means, key_block_states, sla2_forward
            from sla2_kernels.forward import FORWARD_LAUNCH

            from sla2cli.ops.complement import complement_states

            states, norms = key_block_states(k, v, 64)
            comp_states, comp_norms = complement_states(routing.lut, states, norms)
            parts = {
                "pool-q": lambda: block_means(q, 128),
                "pool-k": lambda: block_means(k, 64),
                "topk": lambda s=sparsity: routing.scores.topk(routing.k_sel, dim=-1, sorted=False),
                "key-states": lambda: key_block_states(k, v, 64),
                "complement-gemm": lambda: complement_states(routing.lut, states, norms),
            }
            for name, fn in parts.items():
                record(f"sla2-{name}", sparsity, "fwd", median_ms(fn, rep_ms), share)
            default_launch = FORWARD_LAUNCH[head_dim]
            for launch in ((4, 2), (4, 3), (8, 2), (8, 3)):
                FORWARD_LAUNCH[head_dim] = launch
                record("sla2-main-kernel", sparsity, "fwd", median_ms(
                    lambda: sla2_forward(q, k, v, routing.lut, alpha, comp_states, comp_norms, 128, 64, False,
                                         LINEAR_EPS), rep_ms), share, note=f"warps,stages={launch}")
                record("sla2-sparse-only", sparsity, "fwd", median_ms(
                    lambda: sla2_forward(q, k, v, routing.lut, None, None, None, 128, 64, False, LINEAR_EPS),
                    rep_ms), share, note=f"no linear branch, no routing; warps,stages={launch}")
            FORWARD_LAUNCH[head_dim] = default_launch
        if "fwd+bwd" in modes:
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            ag = alpha.clone().requires_grad_(True)

            def sla2_train(s=sparsity):
                sla2_attention(qg, kg, vg, sparsity=s, alpha=ag).backward(grad)

            record("sla2", sparsity, "fwd+bwd", median_ms(sla2_train, rep_ms), share)
    for row in rows:
        if row["shape"] == shape and row["mode"] in fa2:
            row["speedup_vs_fa2"] = fa2[row["mode"]] / row["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1,12,32760,128"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.97])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--rep-ms", type=int, default=300)
    args = parser.parse_args()
    rows: list[dict] = []
    for spec in args.shapes:
        batch, heads, length, head_dim = (int(x) for x in spec.split(","))
        run_shape(batch, heads, length, head_dim, args.sparsities, args.modes, rows, args.rep_ms)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit())
    columns = ["provider", "shape", "sparsity", "mode", "median_ms", "speedup_vs_fa2", "dense_tflops",
               "sparse_tflops", "note", "device", "torch", "triton", "commit"]
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{c: "" for c in columns}, **row, **meta})
    print(f"{meta}")
    print(f"{'provider':22s} {'shape':16s} {'sparsity':>8s} {'mode':9s} {'ms':>8s} {'vs fa2':>7s}  note")
    for row in rows:
        speed = row.get("speedup_vs_fa2")
        print(f"{row['provider']:22s} {row['shape']:16s} {str(row['sparsity']):>8s} {row['mode']:9s} "
              f"{row['median_ms']:8.3f} {speed if speed is None else round(speed, 1)!s:>7s}  {row['note']}")


if __name__ == "__main__":
    main()
