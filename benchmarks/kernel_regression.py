"""Bit-exactness record of the SLA2 op: fixed inputs in, a checksum of every output and gradient out.

Runs the public API only (sla2cli.ops.sla2_attention, sla2_attention_bshd and a SLA2Attention
layer, forward and backward, in each quant mode the GPU runs) on fixed seeds, for every case of
bf16 x head dim {64, 128} x length {4096, 4001} x sparsity {0.9, 0.97}, with alpha. Each tensor
becomes one line: sha256 of its bytes, then its float64 sum, sum of magnitudes and largest
magnitude. Every case runs twice; a tensor whose two runs differ is marked NONDETERMINISTIC.

Run it at two commits on the same GPU and diff the files: identical lines mean bit-identical
results (only the header, which names the commit, differs). --tensors DIR also saves the tensors
(safetensors, one file per case) to measure how far a changed one moved. On a CPU, --device cpu
with SLA2_BACKEND=triton TRITON_INTERPRET=1 runs the kernels through Triton's interpreter (use
small --lengths, and float32 or float16: the interpreter's bf16 products are not the GPU's).
Usage: python benchmarks/kernel_regression.py --out FILE [--tensors DIR] [--device cuda]
       [--dtype bfloat16] [--head-dims 64 128] [--lengths 4096 4001] [--modes none int8 int8-fp8]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file

import sla2cli
from sla2cli.bench.environment import git_commit
from sla2cli.module import SLA2Attention
from sla2cli.ops import num_blocks, sla2_attention, sla2_attention_bshd
from sla2cli.ops.quantization import QUANT_MODES, QUANT_NONE, supported_quant_modes
from sla2cli.report.output import atomic_path  # this path (not sla2cli.files) also exists in earlier trees

BATCH, HEADS = 2, 2
SPARSITIES = (0.9, 0.97)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fixed_inputs(length: int, head_dim: int, seed: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """q, k, v and the output gradient in `dtype`, alpha (float32, per query block), from a CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, length, head_dim)
    tensors = {name: torch.randn(shape, generator=generator) for name in ("q", "k", "v", "grad_out")}
    tensors["alpha"] = torch.rand(BATCH, HEADS, num_blocks(length, 128), generator=generator)
    return {name: (t if name == "alpha" else t.to(dtype)).to(device) for name, t in tensors.items()}


def run_op(inputs: dict[str, torch.Tensor], sparsity: float, quant: str, bshd: bool) -> dict[str, torch.Tensor]:
    """Output and the gradients of q, k, v, alpha through sla2_attention (or its (B, L, H, D) form)."""
    q, k, v, alpha = (inputs[name].detach().clone().requires_grad_(True) for name in ("q", "k", "v", "alpha"))
    if bshd:
        views = [t.transpose(1, 2) for t in (q, k, v)]
        out = sla2_attention_bshd(*views, sparsity=sparsity, alpha=alpha, quant=quant).transpose(1, 2)
    else:
        out = sla2_attention(q, k, v, sparsity=sparsity, alpha=alpha, quant=quant)
    out.backward(inputs["grad_out"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dalpha": alpha.grad}


def run_layer(inputs: dict[str, torch.Tensor], sparsity: float, quant: str, seed: int) -> dict[str, torch.Tensor]:
    """A SLA2Attention layer with fixed, non-identity router and alpha parameters: output and every gradient."""
    head_dim = inputs["q"].shape[-1]
    layer = SLA2Attention(HEADS, head_dim, sparsity=sparsity, quant=quant)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (layer.proj_q, layer.proj_k):
            parameter += 0.1 * torch.randn(parameter.shape, generator=generator)
        layer.alpha_weight.copy_(1.0 + 0.5 * torch.rand(HEADS, generator=generator))
        layer.alpha_bias.copy_(torch.randn(HEADS, generator=generator))
    layer = layer.to(inputs["q"].device)
    q, k, v = (inputs[name].detach().clone().requires_grad_(True) for name in ("q", "k", "v"))
    out = layer(q, k, v)
    out.backward(inputs["grad_out"])
    result = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    result |= {f"d{name}": parameter.grad for name, parameter in layer.named_parameters()}
    return result


def describe(tensor: torch.Tensor | None) -> str:
    """sha256 of the bytes, then float64 sum, sum of magnitudes, largest magnitude."""
    if tensor is None:
        return "none"
    flat = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    values = flat.double()
    return f"{digest} {values.sum().item():.17g} {values.abs().sum().item():.17g} {values.abs().max().item():.17g}"


def cases(modes: tuple[str, ...], head_dims: list[int], lengths: list[int]):
    """(name, head dim, length, seed, runner) for every case; runners take the inputs, return named tensors."""
    for head_dim, length, sparsity, quant in itertools.product(head_dims, lengths, SPARSITIES, modes):
        seed = 1000 * head_dim + length + int(100 * sparsity)
        tag = f"D{head_dim}-L{length}-s{sparsity}-{quant}"
        yield f"op-{tag}", head_dim, length, seed, lambda x, s=sparsity, m=quant: run_op(x, s, m, bshd=False)
        yield f"layer-{tag}", head_dim, length, seed, lambda x, s=sparsity, m=quant, r=seed: run_layer(x, s, m, r)
    for head_dim in head_dims:  # strided (B, L, H, D) views, at the last length (4001: a partial block)
        seed, length = 7 * head_dim, lengths[-1]
        yield (f"op-bshd-D{head_dim}-L{length}-s0.97-{QUANT_NONE}", head_dim, length, seed,
               lambda x: run_op(x, 0.97, QUANT_NONE, bshd=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the checksum file to write")
    parser.add_argument("--tensors", type=Path, help="also save every case's tensors here (safetensors)")
    parser.add_argument("--device", default="cuda", help="cuda (the Triton kernels) or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="of q, k, v")
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 4001])
    parser.add_argument("--modes", nargs="+", choices=QUANT_MODES, help="quant modes (default: all the device runs)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; the kernels' record needs one (or pass --device cpu)")
    modes = tuple(mode for mode in args.modes or QUANT_MODES if mode in supported_quant_modes(args.device))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    lines = [f"# sla2 {sla2cli.__version__} commit {git_commit()} torch {torch.__version__} device {device_name} "
             f"dtype {args.dtype}"]
    if args.tensors:
        args.tensors.mkdir(parents=True, exist_ok=True)
    for name, head_dim, length, seed, runner in cases(modes, args.head_dims, args.lengths):
        inputs = fixed_inputs(length, head_dim, seed, DTYPES[args.dtype], args.device)
        first, second = runner(inputs), runner(inputs)
        for tensor_name, tensor in first.items():
            again = second[tensor_name]
            stable = (tensor is None and again is None) or (
                tensor is not None and again is not None and torch.equal(tensor, again)
            )
            flag = "" if stable else " NONDETERMINISTIC"
            lines.append(f"{name} {tensor_name} {describe(tensor)}{flag}")
        if args.tensors:
            with atomic_path(args.tensors / f"{name}.safetensors") as temporary:
                save_file({key: t.detach().contiguous().cpu() for key, t in first.items() if t is not None},
                          str(temporary))
        print(name, flush=True)
    with atomic_path(args.out) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines) - 1} checksums to {args.out}")


if __name__ == "__main__":
    main()
