"""Whole-model timing on one GPU: one transformer forward (or training step) with FlashAttention2 vs SLA2,
same weights, and the same model with its self-attention costing nothing.

Builds the recipe's full-size architecture with random weights (no download), times the model's own
attention under the SDPA flash backend, converts it in place to SLA2 and times again on the same inputs.
`--attention-free` then times the converted model with every SLA2 layer returning its values unchanged:
what everything but self-attention costs, so dense time / that time bounds the ratio any attention can
give this model (Amdahl). Appends rows to a CSV with device, versions and commit.
Usage: python benchmarks/model_suite.py --csv model.csv [--recipe wan2.1-t2v-1.3b] [--sparsity 0.97]
       [--modes fwd fwd+bwd] [--attention-free] [--gradient-checkpointing] [--compile]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import sla2cli
from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD
from sla2cli.bench.environment import git_commit
from sla2cli.files import write_csv_file
from sla2cli.module import SLA2Attention
from sla2cli.sources.random_models import build_random_model, example_inputs


def median_ms(fn: Callable[[], object], rep_ms: int = 2000) -> float:
    return float(triton.testing.do_bench(fn, warmup=200, rep=rep_ms, return_mode="median"))


def step(model: torch.nn.Module, inputs: dict, mode: str, grad_out: torch.Tensor) -> Callable[[], object]:
    """A forward without autograd, or forward + backward into every weight's gradient."""
    if mode == FORWARD:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(**inputs, return_dict=False)[0]
        return forward

    def training_step() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs, return_dict=False)[0].backward(grad_out)
    return training_step


def skip_self_attention(model: torch.nn.Module) -> int:
    """Every SLA2 layer returns v as its output: the processors' projections, norms and rotary still run."""
    layers = [module for module in model.modules() if isinstance(module, SLA2Attention)]
    for layer in layers:
        layer.attend = lambda q, k, v: v
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--recipe", default="wan2.1-t2v-1.3b")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--modes", nargs="+", choices=(FORWARD, FORWARD_BACKWARD), default=[FORWARD])
    parser.add_argument("--attention-free", action="store_true",
                        help="also time the model with self-attention skipped (the bound on any attention)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the training step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for every run")
    args = parser.parse_args()
    model = build_random_model(args.recipe, dtype=torch.bfloat16, device="cuda")
    model.requires_grad_(FORWARD_BACKWARD in args.modes)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    inputs = example_inputs(args.recipe, args.resolution, frames=args.frames, dtype=torch.bfloat16, device="cuda")
    latents = str(tuple(inputs["hidden_states"].shape))
    grad_out = torch.randn_like(inputs["hidden_states"])
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit(), checkpointing=args.gradient_checkpointing)
    rows: list[dict] = []

    def time_all(provider: str, sparsity: object, reference: torch.Tensor | None) -> torch.Tensor:
        torch._dynamo.reset()
        runner = torch.compile(model) if args.compile else model
        out = step(runner, inputs, FORWARD, grad_out)()
        rel = 0.0 if reference is None else ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        for mode in args.modes:
            label = f"{mode}-compiled" if args.compile else mode
            ms = median_ms(step(runner, inputs, mode, grad_out))
            model.zero_grad(set_to_none=True)
            dense = next((r["median_ms"] for r in rows if r["provider"] == "fa2" and r["mode"] == label), ms)
            rows.append(dict(provider=provider, model=args.recipe, latents=latents, sparsity=sparsity, mode=label,
                             median_ms=ms, speedup_vs_fa2=dense / ms, rel_l2_vs_dense=rel, **meta))
            print(f"{provider:15s} {label} {args.recipe} {latents} s={sparsity} {ms:.1f} ms  x{dense / ms:.2f}  "
                  f"rel_l2_vs_dense={rel:.3f}", flush=True)
        return out

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        dense_out = time_all("fa2", "", None)
    sla2cli.convert(model, sparsity=args.sparsity)
    time_all("sla2", args.sparsity, dense_out)
    if args.attention_free:
        layers = skip_self_attention(model)
        time_all(f"no-attention ({layers} layers)", "", dense_out)
    write_csv_file(Path(args.csv), list(rows[0]), rows)
    print(meta)


if __name__ == "__main__":
    main()
