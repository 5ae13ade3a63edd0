"""Operator timing on one GPU: SLA2 vs FlashAttention2 (torch SDPA flash backend), same process.

Prints a short table and writes a CSV (one row per measurement) with the device, torch/triton
versions and commit. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed);
`-graph` modes replay a CUDA graph of the whole op (GPU time without Python launch overhead).
Usage: python benchmarks/gpu_suite.py --csv results.csv [--shapes 1,12,32760,128 ...]
       [--parts | --backward-parts | --route-parts | --tma-parts]
       [--quant int8 int8-fp8]  (low-bit sparse branch, rows named sla2-<mode>)
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla2_kernels.common import Launch
from sla2cli.bench.environment import git_commit
from sla2cli.files import write_csv_file
from sla2cli.ops import num_blocks, route, sla2_attention
from sla2cli.ops.complement import complement_states
from sla2cli.ops.geometry import LINEAR_EPS

COLUMNS = ["provider", "shape", "sparsity", "mode", "median_ms", "speedup_vs_fa2", "dense_tflops",
           "sparse_tflops", "note", "device", "torch", "triton", "commit"]


def median_ms(fn, rep_ms: int) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def median_graph_ms(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


class Recorder:
    """Collects rows for one shape; speedups are filled against FA2 of the same mode at the end."""

    def __init__(self, batch, heads, length, head_dim, rows):
        self.shape = f"{batch}x{heads}x{length}x{head_dim}"
        self.forward_flops = 4.0 * batch * heads * length * length * head_dim
        self.rows = rows

    def add(self, provider, sparsity, mode, ms, share=1.0, note=""):
        flops = self.forward_flops * (3.5 if mode.startswith("fwd+bwd") else 1.0)
        self.rows.append(dict(provider=provider, shape=self.shape, sparsity=sparsity, mode=mode, median_ms=ms,
                              dense_tflops=flops / ms / 1e9, sparse_tflops=flops * share / ms / 1e9, note=note))
        print(f"{provider:20s} {self.shape:16s} {sparsity!s:>8s} {mode:9s} {ms:8.3f}  {note}", flush=True)

    def fill_speedups(self):
        fa2 = {r["mode"]: r["median_ms"] for r in self.rows if r["shape"] == self.shape and r["provider"] == "fa2"}
        for row in self.rows:
            base = fa2.get(row["mode"]) or fa2.get(row["mode"].replace("-graph", ""))
            if row["shape"] == self.shape and base:
                row["speedup_vs_fa2"] = base / row["median_ms"]


def time_fa2(rec, q, k, v, grad, modes, rep_ms):
    def forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    if "fwd" in modes:
        rec.add("fa2", "", "fwd", median_ms(forward, rep_ms))
        rec.add("fa2", "", "fwd-graph", median_graph_ms(forward), note="CUDA graph replay")
    if "fwd+bwd" in modes:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def train():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
            out.backward(grad)

        rec.add("fa2", "", "fwd+bwd", median_ms(train, rep_ms))


def time_sla2(rec, q, k, v, alpha, grad, sparsity, modes, rep_ms, quant=None):
    """Times the whole op; `quant` (a low-bit mode) names the row sla2-<mode>."""
    share = route(q, k, sparsity=sparsity).k_sel / num_blocks(q.shape[2], 64)
    name = f"sla2-{quant}" if quant else "sla2"

    def op(*tensors):
        return sla2_attention(*tensors[:3], sparsity=sparsity, alpha=tensors[3], quant=quant)

    if "fwd" in modes:
        rec.add(name, sparsity, "fwd", median_ms(lambda: op(q, k, v, alpha), rep_ms), share)
        rec.add(name, sparsity, "fwd-graph", median_graph_ms(lambda: op(q, k, v, alpha)), share,
                note="CUDA graph replay")
        if not quant:
            rec.add("sla2-routing", sparsity, "fwd", median_ms(lambda: route(q, k, sparsity=sparsity), rep_ms), share)
    if "fwd+bwd" in modes:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        ag = alpha.clone().requires_grad_(True)
        rec.add(name, sparsity, "fwd+bwd", median_ms(lambda: op(qg, kg, vg, ag).backward(grad), rep_ms), share)


def routed_states(q, k, v, sparsity):
    """What the main kernels take: routing, its share of key blocks, key-block and complement states."""
    from sla2_kernels import key_block_states

    routing = route(q, k, sparsity=sparsity)
    share = routing.k_sel / num_blocks(q.shape[2], 64)
    states, norms = key_block_states(k, v, 64)
    return (routing, share, states, norms, *complement_states(routing.lut, states, norms))


def time_parts(rec, q, k, v, alpha, sparsity, rep_ms):
    """Each stage of the forward alone, and the main kernel under several launch settings."""
    from sla2_kernels import block_means, key_block_states

    routing, share, states, norms, comp_states, comp_norms = routed_states(q, k, v, sparsity)
    parts = {
        "pool-q": lambda: block_means(q, 128),
        "pool-k": lambda: block_means(k, 64),
        "topk": lambda: routing.scores.topk(routing.k_sel, dim=-1, sorted=False),
        "key-states": lambda: key_block_states(k, v, 64),
        "complement-gemm": lambda: complement_states(routing.lut, states, norms),
    }
    for name, fn in parts.items():
        rec.add(f"sla2-{name}", sparsity, "fwd", median_ms(fn, rep_ms), share)
    sweep_forward_launches(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms,
                           FORWARD_SWEEP)
    time_backward_parts(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms)


# Forward launch settings swept: (warps, stages, accumulate_linear, tma).
FORWARD_SWEEP = [Launch(4, 2, True), Launch(8, 2, False), Launch(8, 3, False)]
# Blocks of rows gathered through pointers (the defaults) or tensor descriptors (tma).
TMA_FORWARD_SWEEP = [Launch(8, 3), Launch(8, 3, False, True), Launch(8, 2, False, True), Launch(4, 2, True, True)]
TMA_QUERY_SWEEP = [Launch(8, 3), Launch(8, 3, False, True), Launch(8, 2, False, True), Launch(8, 1, False, True)]
TMA_KEY_SWEEP = [Launch(8, 1), Launch(8, 1, False, True), Launch(8, 2, False, True), Launch(8, 3, False, True)]


def sweep_forward_launches(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms, sweep):
    """The forward's main kernel, with and without the linear branch, under each launch setting of `sweep`."""
    import sla2_kernels.forward as forward_module
    from sla2_kernels import sla2_forward

    key = (q.shape[-1], forward_module.CODE_OFF)
    default = forward_module.FORWARD_LAUNCH[key]
    for launch in sweep:
        forward_module.FORWARD_LAUNCH[key] = launch
        note = f"warps,stages,accumulate_linear,tma={tuple(launch)}" + (
            " (default)" if launch == default else "")
        try:
            rec.add("sla2-main-kernel", sparsity, "fwd", median_ms(
                lambda: sla2_forward(q, k, v, routing.lut, alpha, comp_states, comp_norms, 128, 64, False,
                                     LINEAR_EPS), rep_ms), share, note=note)
            rec.add("sla2-sparse-only", sparsity, "fwd", median_ms(
                lambda: sla2_forward(q, k, v, routing.lut, None, None, None, 128, 64, False, LINEAR_EPS), rep_ms),
                share, note="no linear branch, no routing; " + note)
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: note it, sweep on
            print(f"main kernel {note}: {type(error).__name__}: {str(error)[:120]}")
    forward_module.FORWARD_LAUNCH[key] = default


def time_tma_launches(rec, q, k, v, alpha, sparsity, rep_ms):
    """The forward and both backward kernels gathering blocks of rows through pointers or tensor descriptors."""
    routing, share, _, _, comp_states, comp_norms = routed_states(q, k, v, sparsity)
    sweep_forward_launches(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms,
                           TMA_FORWARD_SWEEP)
    time_backward_parts(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms,
                        query_sweep=TMA_QUERY_SWEEP, key_sweep=TMA_KEY_SWEEP)


def time_route_launches(rec, q, k, sparsity, rep_ms):
    """The routing kernels under each launch setting, beside PyTorch's routing (pool, GEMM, top-k, sort)."""
    from sla2_kernels.routing import ROUTE_LAUNCH, RouteLaunch, route_blocks

    k_sel = route(q, k, sparsity=sparsity).k_sel
    share = k_sel / num_blocks(q.shape[2], 64)
    backend = os.environ.get("SLA2_BACKEND")
    os.environ["SLA2_BACKEND"] = "torch"
    rec.add("sla2-routing-torch", sparsity, "fwd", median_ms(lambda: route(q, k, sparsity=sparsity), rep_ms), share)
    if backend is None:
        del os.environ["SLA2_BACKEND"]
    else:
        os.environ["SLA2_BACKEND"] = backend
    score_launches = [RouteLaunch(rows, warps, ROUTE_LAUNCH.select_elements, ROUTE_LAUNCH.select_warps)
                      for rows, warps in itertools.product((16, 32, 64), (4, 8))]
    select_launches = [RouteLaunch(ROUTE_LAUNCH.rows, ROUTE_LAUNCH.num_warps, elements, warps)
                       for elements, warps in itertools.product((1024, 2048, 4096, 8192), (1, 2, 4, 8))]
    for launch in dict.fromkeys(score_launches + select_launches):
        note = f"{RouteLaunch._fields}={tuple(launch)}" + (" (default)" if launch == ROUTE_LAUNCH else "")
        rec.add("sla2-routing-kernels", sparsity, "fwd",
                median_ms(lambda launch=launch: route_blocks(q, k, None, 128, 64, k_sel, launch), rep_ms), share,
                note=note)


def time_backward_parts(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms,
                        query_sweep=None, key_sweep=None):
    """The backward's stages alone: query kernel, complement GEMM of dH, reverse map, key kernel."""
    from sla2_kernels import reverse_lut, sla2_backward_key, sla2_backward_query, sla2_forward
    from sla2cli.ops.complement import complement_state_grads

    _, lse, out_sparse = sla2_forward(q, k, v, routing.lut, alpha, comp_states, comp_norms, 128, 64, True,
                                      LINEAR_EPS)
    grad = torch.randn_like(q)
    num_k_blocks = num_blocks(q.shape[2], 64)

    def query_side():
        return sla2_backward_query(grad, q, k, v, routing.lut, alpha, out_sparse, lse, comp_states, comp_norms,
                                   128, 64, LINEAR_EPS)

    _, delta, grad_sparse, _, dstate_q, dnorm_q = query_side()
    key_dstates, key_dnorms = complement_state_grads(routing.lut, num_k_blocks, dstate_q, dnorm_q)
    parts = {
        "bwd-query-kernel": query_side,
        "bwd-complement-gemm": lambda: complement_state_grads(routing.lut, num_k_blocks, dstate_q, dnorm_q),
        "bwd-reverse-map": lambda: reverse_lut(routing.lut, num_k_blocks),
        "bwd-key-kernel": lambda: sla2_backward_key(grad_sparse, q, k, v, routing.lut, lse, delta, key_dstates,
                                                    key_dnorms, 128, 64),
    }
    for name, fn in parts.items():
        rec.add(f"sla2-{name}", sparsity, "bwd", median_ms(fn, rep_ms), share)
    sweep_backward_launches(rec, query_side, parts["bwd-key-kernel"], q.shape[-1], share, sparsity, rep_ms,
                            BACKWARD_SWEEP if query_sweep is None else query_sweep,
                            KEY_SWEEP if key_sweep is None else key_sweep)


# Backward launch settings swept: warps x pipeline stages (4 stages run out of shared memory at D = 128), the key
# side with its query blocks read through pointers or tensor descriptors, the query side through pointers.
KEY_SWEEP = [Launch(w, s, tma=tma) for w in (4, 8) for s in (1, 2, 3) for tma in (False, True)]
BACKWARD_SWEEP = [launch for launch in KEY_SWEEP if not launch.tma]


def sweep_backward_launches(rec, query_side, key_side, head_dim, share, sparsity, rep_ms, query_sweep, key_sweep):
    """Each backward kernel under every setting of its sweep; a setting that fails to compile is noted."""
    import sla2_kernels.backward as backward_module

    for name, table, run, sweep in (("query", backward_module.QUERY_LAUNCH, query_side, query_sweep),
                                    ("key", backward_module.KEY_LAUNCH, key_side, key_sweep)):
        default = table[head_dim]
        for launch in sweep:
            table[head_dim] = launch
            note = f"warps,stages,tma=({launch.num_warps}, {launch.num_stages}, {launch.tma})"
            try:
                ms = median_ms(run, rep_ms)
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: note it, sweep on
                print(f"bwd-{name}-kernel {note}: {type(error).__name__}: {str(error)[:120]}")
                continue
            rec.add(f"sla2-bwd-{name}-kernel", sparsity, "bwd", ms, share,
                    note=note + (" (default)" if launch == default else ""))
        table[head_dim] = default


def run_shape(spec, sparsities, modes, rows, rep_ms, parts, quant_modes=()):
    batch, heads, length, head_dim = (int(x) for x in spec.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    grad = torch.randn_like(q)
    alpha = torch.rand(batch, heads, num_blocks(length, 128), device="cuda", generator=gen)
    rec = Recorder(batch, heads, length, head_dim, rows)
    time_fa2(rec, q, k, v, grad, modes, rep_ms)
    for sparsity in sparsities:
        time_sla2(rec, q, k, v, alpha, grad, sparsity, modes, rep_ms)
        for quant in quant_modes:
            time_sla2(rec, q, k, v, alpha, grad, sparsity, modes, rep_ms, quant)
        if parts == "all":
            time_parts(rec, q, k, v, alpha, sparsity, rep_ms)
        elif parts == "tma":
            time_tma_launches(rec, q, k, v, alpha, sparsity, rep_ms)
        elif parts == "route":
            time_route_launches(rec, q, k, sparsity, rep_ms)
        elif parts == "backward":
            routing, share, _, _, comp_states, comp_norms = routed_states(q, k, v, sparsity)
            time_backward_parts(rec, q, k, v, alpha, routing, comp_states, comp_norms, share, sparsity, rep_ms)
    rec.fill_speedups()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1,12,32760,128"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.97])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--rep-ms", type=int, default=300)
    parser.add_argument("--parts", action="store_const", const="all", help="also time each stage and launch settings")
    parser.add_argument("--backward-parts", dest="parts", action="store_const", const="backward",
                        help="also time the backward's stages and sweep its launch settings (not the forward's)")
    parser.add_argument("--route-parts", dest="parts", action="store_const", const="route",
                        help="also time the routing kernels under each launch setting beside PyTorch's routing")
    parser.add_argument("--tma-parts", dest="parts", action="store_const", const="tma",
                        help="also time the forward and both backward kernels gathering blocks of rows through "
                             "pointers or tensor descriptors, under a few launch settings each")
    parser.add_argument("--quant", nargs="*", default=[], help="low-bit modes to time beside bf16 SLA2")
    args = parser.parse_args()
    rows: list[dict] = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit())
    print(meta)
    for spec in args.shapes:  # the CSV is rewritten after each shape: a run cut short keeps what it measured
        run_shape(spec, args.sparsities, args.modes, rows, args.rep_ms, args.parts, args.quant)
        write_csv_file(args.csv, COLUMNS, [{**row, **meta} for row in rows])
    print(f"{'provider':20s} {'shape':16s} {'sparsity':>8s} {'mode':9s} {'ms':>8s} {'vs fa2':>7s}  note")
    for row in rows:
        speed = row.get("speedup_vs_fa2")
        print(f"{row['provider']:20s} {row['shape']:16s} {str(row['sparsity']):>8s} {row['mode']:9s} "
              f"{row['median_ms']:8.3f} {'' if speed is None else round(speed, 1)!s:>7s}  {row['note']}")


if __name__ == "__main__":
    main()
