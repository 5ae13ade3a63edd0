"""What each low-bit choice costs or buys in the sparse-branch kernel alone, on the GPU.

A stripped sparse-branch kernel (LUT walk + online softmax, no linear branch) with compile-time
switches for the Q.K^T precision and scale granularity, the P.V precision, the score arithmetic
and Triton's warp specialisation, timed at one shape for a sparse LUT and for an all-blocks LUT
(steady-state throughput). Operands are prepared outside the timed region, so the numbers are the
attention loop's own. Each row also reports the rel. L2 error of that variant's sparse-branch
output against a float32 reference on two heads, and whether the PTX uses Hopper wgmma.

    python benchmarks/lowbit_variants.py --csv OUT.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from sla2cli.bench.environment import git_commit
from sla2cli.files import atomic_path

QK_BF16, QK_INT8_TOKEN, QK_INT8_BLOCK, QK_FP8_BLOCK, QK_INT8_BLOCK_QHERE, QK_INT8_TOKEN_FMA = 0, 1, 2, 3, 4, 5
PV_INPUT, PV_FP8, PV_FP16 = 0, 1, 2
QK_NAMES = {QK_BF16: "bf16", QK_INT8_TOKEN: "int8-token", QK_INT8_BLOCK: "int8-block", QK_FP8_BLOCK: "fp8-block",
            QK_INT8_BLOCK_QHERE: "int8-block-q-in-kernel", QK_INT8_TOKEN_FMA: "int8-token-prequant-q"}
PV_NAMES = {PV_INPUT: "bf16", PV_FP8: "fp8", PV_FP16: "fp16"}


@triton.jit
def _variant_kernel(
    Q, QLow, QScale, K, KLow, KScale, V, V8T, VScale, Lut, Out,
    length, num_q_blocks, k_sel, padded_length, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    QK: tl.constexpr, PV: tl.constexpr, FMA: tl.constexpr, WS: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_valid = rows < length
    base = bh * length * HEAD_DIM
    if QK == 0:
        q = tl.load(Q + base + rows[:, None] * HEAD_DIM + cols[None, :], mask=row_valid[:, None], other=0.0)
        row_scale = tl.full([BLOCK_M], 1.0, tl.float32) * qk_scale_log2
    elif QK == 1 or QK == 4:
        # per-token Q quantised here (the production kernel's way)
        qf = tl.load(Q + base + rows[:, None] * HEAD_DIM + cols[None, :], mask=row_valid[:, None],
                     other=0.0).to(tl.float32)
        row_scale = tl.maximum(tl.max(tl.abs(qf), axis=1), 1e-30) / 127.0
        scaled = qf * (1.0 / row_scale)[:, None]
        q = (scaled + tl.where(scaled >= 0, 0.5, -0.5)).to(tl.int8)
        row_scale = row_scale * qk_scale_log2
    else:
        q = tl.load(QLow + base + rows[:, None] * HEAD_DIM + cols[None, :], mask=row_valid[:, None], other=0)
        row_scale = tl.load(QScale + bh * length + rows, mask=row_valid, other=0.0) * qk_scale_log2
    lut_base = Lut + (bh * num_q_blocks + q_block) * k_sel
    low_base = bh * padded_length * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in tl.range(0, k_sel, warp_specialize=WS):
        key_block = tl.load(lut_base + t)
        keys = key_block * BLOCK_N + offs_n
        key_valid = keys < length
        if QK == 0:
            k = tl.load(K + base + keys[None, :] * HEAD_DIM + cols[:, None], mask=key_valid[None, :], other=0.0)
            raw = tl.dot(q, k)
            step_scale = row_scale
        elif QK == 1:
            k = tl.load(KLow + low_base + keys[None, :] * HEAD_DIM + cols[:, None], mask=key_valid[None, :],
                        other=0)
            k_scale = tl.load(KScale + bh * padded_length + keys, mask=key_valid, other=0.0)
            raw = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * k_scale[None, :]
            step_scale = row_scale
        elif QK == 5:
            k = tl.load(KLow + low_base + keys[None, :] * HEAD_DIM + cols[:, None])
            k_scale = tl.load(KScale + bh * padded_length + keys)
            raw = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * k_scale[None, :]
            step_scale = row_scale
        elif QK == 2 or QK == 4:
            k = tl.load(KLow + low_base + keys[None, :] * HEAD_DIM + cols[:, None])
            raw = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
            step_scale = row_scale * tl.load(KScale + bh * (padded_length // BLOCK_N) + key_block)
        else:
            k = tl.load(KLow + low_base + keys[None, :] * HEAD_DIM + cols[:, None])
            raw = tl.dot(q, k)
            step_scale = row_scale * tl.load(KScale + bh * (padded_length // BLOCK_N) + key_block)
        if FMA:
            # max over unscaled scores (scales are positive), then one FMA per element
            raw = tl.where(key_valid[None, :], raw, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(raw, axis=1) * step_scale)
            p = tl.math.exp2(raw * step_scale[:, None] - m_new[:, None])
        else:
            s = tl.where(key_valid[None, :], raw * step_scale[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if PV == 1:
            v8t = tl.load(V8T + bh * HEAD_DIM * padded_length + cols[:, None] * padded_length + keys[None, :])
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(v8t), acc)
        else:
            v = tl.load(V + base + keys[:, None] * HEAD_DIM + cols[None, :], mask=key_valid[:, None], other=0.0)
            if PV == 2:
                acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    if PV == 1:
        out = out * (tl.load(VScale + bh * HEAD_DIM + cols) / 448.0)[None, :]
    tl.store(Out + base + rows[:, None] * HEAD_DIM + cols[None, :], out.to(Out.dtype.element_ty),
             mask=row_valid[:, None])


def random_lut(bh: int, q_blocks: int, k_blocks: int, k_sel: int, device: str) -> torch.Tensor:
    scores = torch.rand(bh, q_blocks, k_blocks, device=device)
    return scores.topk(k_sel, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()


def prepare(q, k, v, block_n: int) -> dict[str, torch.Tensor]:
    """Low-bit operands in every layout the variants read (smoothed K, padded to whole blocks)."""
    bh, length, dim = q.shape
    padded = triton.cdiv(length, block_n) * block_n
    qf, vf = q.float(), v.float()
    kf = k.float() - k.float().mean(dim=1, keepdim=True)
    k_pad = torch.zeros(bh, padded, dim, device=q.device)
    k_pad[:, :length] = kf
    v_pad = torch.zeros(bh, padded, dim, device=q.device)
    v_pad[:, :length] = vf
    ops: dict[str, torch.Tensor] = {}
    ops["q_tok_scale"] = qf.abs().amax(-1).clamp_min(1e-30) / 127.0
    ops["q_int8"] = torch.round(qf / ops["q_tok_scale"][..., None]).to(torch.int8)
    ops["q_fp8_scale"] = qf.abs().amax(-1).clamp_min(1e-30) / 448.0
    ops["q_fp8"] = (qf / ops["q_fp8_scale"][..., None]).to(torch.float8_e4m3fn)
    ops["k_tok_scale"] = k_pad.abs().amax(-1).clamp_min(1e-30) / 127.0
    ops["k_int8_tok"] = torch.round(k_pad / ops["k_tok_scale"][..., None]).to(torch.int8)
    blocks = k_pad.view(bh, padded // block_n, block_n, dim)
    ops["k_blk_scale"] = blocks.abs().amax((-1, -2)).clamp_min(1e-30) / 127.0
    ops["k_int8_blk"] = torch.round(blocks / ops["k_blk_scale"][..., None, None]).to(torch.int8).view(bh, padded, dim)
    ops["k_fp8_scale"] = blocks.abs().amax((-1, -2)).clamp_min(1e-30) / 448.0
    ops["k_fp8_blk"] = (blocks / ops["k_fp8_scale"][..., None, None]).to(torch.float8_e4m3fn).view(bh, padded, dim)
    ops["v_scale"] = v_pad.abs().amax(1).clamp_min(1e-30) / 448.0
    ops["v8t"] = (v_pad / ops["v_scale"][:, None, :]).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()
    return ops


def launch(variant: dict, q, k, v, ops, lut, out, block_m: int, block_n: int):
    bh, length, dim = q.shape
    qk = variant["qk"]
    q_low = {QK_INT8_BLOCK: ops["q_int8"], QK_FP8_BLOCK: ops["q_fp8"], QK_INT8_TOKEN_FMA: ops["q_int8"]}.get(qk, q)
    q_scale = {QK_INT8_BLOCK: ops["q_tok_scale"], QK_FP8_BLOCK: ops["q_fp8_scale"],
               QK_INT8_TOKEN_FMA: ops["q_tok_scale"]}.get(qk, q)
    k_low = {QK_INT8_TOKEN: ops["k_int8_tok"], QK_INT8_BLOCK: ops["k_int8_blk"], QK_INT8_BLOCK_QHERE: ops["k_int8_blk"],
             QK_FP8_BLOCK: ops["k_fp8_blk"], QK_INT8_TOKEN_FMA: ops["k_int8_tok"]}.get(qk, k)
    k_scale = {QK_INT8_TOKEN: ops["k_tok_scale"], QK_INT8_BLOCK: ops["k_blk_scale"],
               QK_INT8_BLOCK_QHERE: ops["k_blk_scale"], QK_FP8_BLOCK: ops["k_fp8_scale"],
               QK_INT8_TOKEN_FMA: ops["k_tok_scale"]}.get(qk, k)
    grid = (triton.cdiv(length, block_m), bh)
    return _variant_kernel[grid](
        q, q_low, q_scale, k, k_low, k_scale, v, ops["v8t"], ops["v_scale"], lut, out,
        length, grid[0], lut.shape[-1], ops["v8t"].shape[-1], dim**-0.5 * math.log2(math.e),
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        QK=qk, PV=variant["pv"], FMA=variant["fma"], WS=variant["ws"],
        num_warps=variant["warps"], num_stages=variant["stages"],
    )


def reference(q, k, v, lut, heads: int, block_m: int, block_n: int) -> torch.Tensor:
    """float32 sparse branch of the first `heads` heads: softmax over each query block's LUT keys."""
    outs = []
    length, dim = q.shape[1], q.shape[2]
    for h in range(heads):
        qf, kf, vf = q[h].float(), k[h].float(), v[h].float()
        out = torch.empty_like(qf)
        for qb in range(triton.cdiv(length, block_m)):
            keys = (lut[h, qb].long()[:, None] * block_n + torch.arange(block_n, device=q.device)).flatten()
            keys = keys[keys < length]
            rows = slice(qb * block_m, min((qb + 1) * block_m, length))
            attn = torch.softmax(qf[rows] @ kf[keys].T * dim**-0.5, dim=-1)
            out[rows] = attn @ vf[keys]
        outs.append(out)
    return torch.stack(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True)
    parser.add_argument("--shape", default="12,32760,128", help="B*H,L,D")
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--label", default="")
    parser.add_argument("--group", choices=["all", "scales"], default="all",
                        help="all: every precision pair; scales: where the Q/K scales come from")
    parser.add_argument("--no-ws", action="store_true", help="skip warp-specialised builds")
    args = parser.parse_args()
    bh, length, dim = (int(x) for x in args.shape.split(","))
    block_m, block_n = 128, 64
    torch.manual_seed(0)
    device = "cuda"
    q, k, v = (torch.randn(bh, length, dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, dim, device=device, dtype=torch.bfloat16)  # a channel offset to smooth away
    ops = prepare(q, k, v, block_n)
    q_blocks, k_blocks = triton.cdiv(length, block_m), triton.cdiv(length, block_n)
    k_sel = max(1, math.ceil((1 - args.sparsity) * k_blocks))
    sparse_lut = random_lut(bh, q_blocks, k_blocks, k_sel, device)
    dense_lut = torch.arange(k_blocks, device=device, dtype=torch.int32).expand(bh, q_blocks, k_blocks).contiguous()
    ref = reference(q, k, v, sparse_lut, 2, block_m, block_n)
    flops_sparse = 4.0 * bh * length * k_sel * block_n * dim
    flops_dense = 4.0 * bh * length * length * dim
    groups = {
        "all": [dict(qk=QK_BF16, pv=PV_INPUT, fma=0), dict(qk=QK_BF16, pv=PV_INPUT, fma=1),
                dict(qk=QK_INT8_TOKEN, pv=PV_FP16, fma=0), dict(qk=QK_INT8_TOKEN, pv=PV_FP8, fma=0),
                dict(qk=QK_INT8_BLOCK, pv=PV_INPUT, fma=1), dict(qk=QK_INT8_BLOCK, pv=PV_FP8, fma=1),
                dict(qk=QK_FP8_BLOCK, pv=PV_INPUT, fma=1), dict(qk=QK_FP8_BLOCK, pv=PV_FP8, fma=1)],
        "scales": [dict(qk=QK_BF16, pv=PV_INPUT, fma=1), dict(qk=QK_INT8_BLOCK, pv=PV_INPUT, fma=1),
                   dict(qk=QK_INT8_BLOCK, pv=PV_FP16, fma=1), dict(qk=QK_INT8_BLOCK_QHERE, pv=PV_INPUT, fma=1),
                   dict(qk=QK_INT8_TOKEN_FMA, pv=PV_INPUT, fma=1)],
    }
    base_variants = groups[args.group]
    launches = [(4, 2), (4, 3), (8, 2), (8, 3), (8, 4)]
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=(git_commit() or "") + args.label, shape=args.shape, sparsity=args.sparsity, k_sel=k_sel)
    rows = []
    out = torch.empty_like(q)
    for base in base_variants:
        best = None
        for ws in ((0,) if args.no_ws else (0, 1)):
            for warps, stages in (launches if ws == 0 else [(4, 2), (8, 2), (8, 3)]):
                variant = dict(base, ws=ws, warps=warps, stages=stages)
                try:
                    handle = launch(variant, q, k, v, ops, sparse_lut, out, block_m, block_n)
                    torch.cuda.synchronize()
                except Exception as error:  # noqa: BLE001 - a variant Triton cannot build is a result too
                    reason = str(error).splitlines()[0][:120] if str(error) else ""
                    print(f"build failed: {variant}: {type(error).__name__}: {reason}", flush=True)
                    continue
                ms = triton.testing.do_bench(
                    lambda variant=variant: launch(variant, q, k, v, ops, sparse_lut, out, block_m, block_n),
                    warmup=20, rep=120, return_mode="median")
                err = ((out[:2].float() - ref).norm() / ref.norm()).item()
                ptx = handle.asm.get("ptx", "")
                row = dict(meta, qk=QK_NAMES[base["qk"]], pv=PV_NAMES[base["pv"]], fma=base["fma"], ws=ws,
                           warps=warps, stages=stages, lut="sparse", ms=round(ms, 4),
                           tflops=round(flops_sparse / ms / 1e9, 1), rel_l2_vs_fp32=round(err, 5),
                           wgmma=int("wgmma" in ptx), regs=handle.n_regs, spills=handle.n_spills)
                rows.append(row)
                print(row, flush=True)
                if best is None or ms < best[0]:
                    best = (ms, variant)
        if best is not None:
            variant = best[1]
            ms = triton.testing.do_bench(
                lambda variant=variant: launch(variant, q, k, v, ops, dense_lut, out, block_m, block_n),
                warmup=5, rep=200, return_mode="median")
            row = dict(meta, qk=QK_NAMES[variant["qk"]], pv=PV_NAMES[variant["pv"]], fma=variant["fma"],
                       ws=variant["ws"], warps=variant["warps"], stages=variant["stages"], lut="all-blocks",
                       ms=round(ms, 4), tflops=round(flops_dense / ms / 1e9, 1), rel_l2_vs_fp32="",
                       wgmma="", regs="", spills="")
            rows.append(row)
            print(row, flush=True)
    with atomic_path(Path(args.csv)) as temporary, open(temporary, "w", newline="") as handle_csv:
        writer = csv.DictWriter(handle_csv, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\nbest per variant (sparse LUT):")
    for base in base_variants:
        mine = [r for r in rows if r["lut"] == "sparse" and r["qk"] == QK_NAMES[base["qk"]]
                and r["pv"] == PV_NAMES[base["pv"]] and r["fma"] == base["fma"]]
        if mine:
            r = min(mine, key=lambda r: r["ms"])
            print(f"  qk={r['qk']:10s} pv={r['pv']:4s} fma={r['fma']} ws={r['ws']} {r['warps']}w{r['stages']}s "
                  f"{r['ms']:.3f} ms {r['tflops']:6.1f} TF err {r['rel_l2_vs_fp32']:.4f} wgmma={r['wgmma']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
