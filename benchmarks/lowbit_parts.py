"""Stage timings of the low-bit forward on one GPU, beside the bf16 kernel (same process).

Times the key/value quantisation pre-pass and its pieces, and the attention kernel alone in each
precision with the routing and linear-branch states computed once beforehand. Also checks which
rounding the GPU's float32 -> FP8 e4m3 conversion in Triton performs (direct, or through fp16).
Usage: python benchmarks/lowbit_parts.py [--shape 1,12,32760,128] [--sparsity 0.97]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from sla2_kernels import key_block_states, sla2_forward
from sla2_kernels.forward import QUANT_INT8_FP8, QUANT_INT8_FP16, QUANT_OFF
from sla2_kernels.quantize import quantize_keys_values, value_channel_scales
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
    args = parser.parse_args()
    print(fp8_conversion_report())
    batch, heads, length, head_dim = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    alpha = torch.rand(batch, heads, num_blocks(length, 128), device="cuda")
    lut = route(q, k, sparsity=args.sparsity).lut
    states, norms = key_block_states(k, v, 64)
    comp_states, comp_norms = complement_states(lut, states, norms)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")

    timings = {
        "key mean (torch)": bench(lambda: k.mean(dim=2, dtype=torch.float32)),
        "value channel scales (torch)": bench(lambda: value_channel_scales(v)),
        "quantize keys (int8)": bench(lambda: quantize_keys_values(k, v, 64, False)),
        "quantize keys+values (int8, fp8)": bench(lambda: quantize_keys_values(k, v, 64, True)),
    }
    for name, mode in (("bf16", QUANT_OFF), ("int8-fp16", QUANT_INT8_FP16), ("int8-fp8", QUANT_INT8_FP8)):
        timings[f"whole forward kernel call {name}"] = bench(lambda mode=mode: sla2_forward(
            q, k, v, lut, alpha, comp_states, comp_norms, 128, 64, False, LINEAR_EPS, mode))
    from sla2_kernels import forward as forward_module

    default_launch = forward_module.FORWARD_LAUNCH[head_dim]
    for launch in ((4, 2), (4, 3), (8, 2), (8, 4)):
        forward_module.FORWARD_LAUNCH[head_dim] = launch
        for name, mode in (("int8-fp16", QUANT_INT8_FP16), ("int8-fp8", QUANT_INT8_FP8)):
            timings[f"forward {name} warps,stages={launch}"] = bench(lambda mode=mode: sla2_forward(
                q, k, v, lut, alpha, comp_states, comp_norms, 128, 64, False, LINEAR_EPS, mode))
    forward_module.FORWARD_LAUNCH[head_dim] = default_launch
    for name, ms in timings.items():
        print(f"{name:40s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
