"""GPU time of every kernel the SLA2 op launches (torch.profiler), forward and forward+backward.

Where gpu_suite.py --parts times each stage alone (launch gaps included), this lists what the GPU
itself spends per kernel inside one whole call, so the stages' shares add up to the op.
Usage: python benchmarks/profile_op.py --csv kernels.csv [--shapes 1,12,32760,128 ...] [--sparsity 0.97]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from sla2cli.bench.environment import git_commit
from sla2cli.files import write_csv_file
from sla2cli.ops import num_blocks, sla2_attention

COLUMNS = ["shape", "sparsity", "mode", "kernel", "calls_per_op", "gpu_us_per_op", "share",
           "device", "torch", "triton", "commit"]
REPEATS = 10


def kernel_times(fn, repeats: int) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches per call, GPU microseconds per call)} over `repeats` calls after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time_total
    return {name: (calls // repeats, us / repeats) for name, (calls, us) in totals.items()}


def profile_shape(spec: str, sparsity: float, rows: list[dict]) -> None:
    batch, heads, length, head_dim = (int(x) for x in spec.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    alpha = torch.rand(batch, heads, num_blocks(length, 128), device="cuda", generator=gen)
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, alpha)]

    def forward():
        with torch.no_grad():
            sla2_attention(q, k, v, sparsity=sparsity, alpha=alpha)

    def forward_backward():
        sla2_attention(*leaves[:3], sparsity=sparsity, alpha=leaves[3]).backward(grad)

    for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = kernel_times(fn, REPEATS)
        total = sum(us for _, us in times.values())
        print(f"\n{spec} {sparsity} {mode}: {total:.1f} us of GPU time per call", flush=True)
        for name, (calls, us) in sorted(times.items(), key=lambda item: -item[1][1]):
            print(f"  {us:9.1f} us {100 * us / total:5.1f}%  x{calls:<3d} {name[:110]}")
            rows.append(dict(shape=f"{batch}x{heads}x{length}x{head_dim}", sparsity=sparsity, mode=mode,
                             kernel=name, calls_per_op=calls, gpu_us_per_op=us, share=us / total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1,12,32760,128", "1,40,75600,128"])
    parser.add_argument("--sparsity", type=float, default=0.97)
    args = parser.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit())
    print(meta)
    rows: list[dict] = []
    for spec in args.shapes:
        profile_shape(spec, args.sparsity, rows)
        write_csv_file(args.csv, COLUMNS, [{**row, **meta} for row in rows])


if __name__ == "__main__":
    main()
