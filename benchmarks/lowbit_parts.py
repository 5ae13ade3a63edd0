"""Stage timings of the low-bit forward on one GPU, beside the bf16 kernel (same process).

Times the quantisation passes, and the forward kernel call (which includes them in the low-bit
modes) in each precision under several launch settings, with the routing and linear-branch states
computed once beforehand. Every time is a CUDA-graph replay, so short kernels are not inflated by
Python launch overhead. Also checks which
rounding the GPU's float32 -> FP8 e4m3 conversion in Triton performs (direct, or through fp16).
Usage: python benchmarks/lowbit_parts.py [--shape 1,12,32760,128] [--sparsity 0.97] [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import triton
import triton.language as tl

from sla2_kernels import forward as forward_module
from sla2_kernels import key_block_states, sla2_forward
from sla2_kernels import quantize as quantize_module
from sla2_kernels.common import Launch
from sla2_kernels.modes import QUANT_INT8, QUANT_INT8_FP8, QUANT_NONE, kernel_code
from sla2_kernels.quantize import key_value_statistics, quantize_operands
from sla2cli.bench.environment import git_commit
from sla2cli.files import atomic_path
from sla2cli.ops import num_blocks, route
from sla2cli.ops.complement import complement_states
from sla2cli.ops.geometry import LINEAR_EPS


@triton.jit
def _to_fp8_kernel(X, Y, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(Y + offsets, tl.load(X + offsets).to(tl.float8e4nv))


def fp8_conversion_report() -> str:
    x = torch.rand(4096, device="cuda") * 448
    y = torch.empty(4096, device="cuda", dtype=torch.float8_e4m3fn)
    _to_fp8_kernel[(1,)](x, y, N=4096)
    kernel = y.float()
    direct = x.to(torch.float8_e4m3fn).float()
    via_half = x.half().to(torch.float8_e4m3fn).float()
    return (f"fp8 conversion: differs from torch direct on {(kernel != direct).sum().item()} / 4096, "
            f"from torch via fp16 on {(kernel != via_half).sum().item()} / 4096")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1,12,32760,128")
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--csv", help="also write the timings here")
    args = parser.parse_args()
    conversion = fp8_conversion_report()
    print(conversion)
    batch, heads, length, head_dim = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    alpha = torch.rand(batch, heads, num_blocks(length, 128), device="cuda")
    lut = route(q, k, sparsity=args.sparsity).lut
    states, norms = key_block_states(k, v, 64)
    comp_states, comp_norms = complement_states(lut, states, norms)

    def bench(fn):
        """GPU time of one call, replayed from a CUDA graph: launch overhead of small kernels excluded."""
        fn()  # compile outside the capture
        return triton.testing.do_bench_cudagraph(fn, rep=150, return_mode="median")

    timings = {}
    default_stats = quantize_module.STATS_CHUNK, quantize_module.STATS_BLOCK, quantize_module.STATS_LAUNCH
    for chunk, block, warps in ((512, 32, 4), (1024, 32, 4), (2048, 32, 4)):
        launch = default_stats[2]._replace(num_warps=warps)
        quantize_module.STATS_CHUNK, quantize_module.STATS_BLOCK, quantize_module.STATS_LAUNCH = chunk, block, launch
        tag = " (default)" if (chunk, block, launch) == default_stats else ""
        timings[f"key statistics chunk,block,warps={chunk},{block},{warps}{tag}"] = bench(
            lambda: key_value_statistics(k, v, False)
        )
    quantize_module.STATS_CHUNK, quantize_module.STATS_BLOCK, quantize_module.STATS_LAUNCH = default_stats
    timings |= {
        "key statistics (mean, channel gains)": bench(lambda: key_value_statistics(k, v, False)),
        "key + value statistics": bench(lambda: key_value_statistics(k, v, True)),
        "all int8 operands (stats, Q, K)": bench(lambda: quantize_operands(q, k, v, 128, 64, False)),
        "all int8-fp8 operands (stats, Q, K, V)": bench(lambda: quantize_operands(q, k, v, 128, 64, True)),
    }
    modes = (("bf16", kernel_code(QUANT_NONE)), (QUANT_INT8, kernel_code(QUANT_INT8)),
             (QUANT_INT8_FP8, kernel_code(QUANT_INT8_FP8)))
    for name, mode in modes:
        timings[f"sparse branch only, kernel call {name}"] = bench(
            lambda mode=mode: sla2_forward(q, k, v, lut, None, None, None, 128, 64, False, LINEAR_EPS, mode)
        )
    for name, mode in modes:
        key = (head_dim, mode)
        default_launch = forward_module.FORWARD_LAUNCH[key]
        for launch in ((4, 2, True), (4, 2, False), (4, 3, True), (8, 2, False), (8, 3, False), (8, 3, True)):
            forward_module.FORWARD_LAUNCH[key] = Launch(*launch)
            tag = " (default)" if launch == tuple(default_launch) else ""
            timings[f"forward kernel call {name} warps,stages,accumulate={launch}{tag}"] = bench(
                lambda mode=mode: sla2_forward(
                    q, k, v, lut, alpha, comp_states, comp_norms, 128, 64, False, LINEAR_EPS, mode
                )
            )
        forward_module.FORWARD_LAUNCH[key] = default_launch
    for name, ms in timings.items():
        print(f"{name:40s} {ms:8.3f} ms")
    if args.csv:
        meta = dict(shape="x".join(map(str, q.shape)), sparsity=args.sparsity, device=torch.cuda.get_device_name(),
                    torch=torch.__version__, triton=triton.__version__, commit=git_commit())
        rows = [dict(stage=name, median_ms=round(ms, 4), note="CUDA graph replay", **meta)
                for name, ms in timings.items()]
        rows.append(dict(stage="fp8 conversion check", median_ms="", note=conversion, **meta))
        with atomic_path(Path(args.csv)) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
