"""Where the error at high sparsity comes from: the router, the linear branch, or the block budget.

Per converted layer of an SLA2 checkpoint (the embedded model by default), on q, k, v captured at three
timesteps of two calibration clips, with the TRUE top-k key blocks (by softmax block mass) as the selection,
so the router is out of the picture. Relative L2 against full attention, per head, averaged:

    sparse_only   O_s alone (alpha = 1)
    phi_softmax   alpha O_s + (1 - alpha) O_l, the linear branch as SLA2 runs it (phi = softmax over features)
    phi_learned   the same with phi(x) = softmax(x W), one D x D map per head for Q and one for K, fit by Adam
                  on the first clip's calls and measured on the second's
    coarse_comp   the linear branch replaced by softmax attention over the complement blocks' mean keys (each
                  weighted by its size) applied to their mean values: a block-level stand-in for the complement
    coarse_merged the same merged with O_s by the two softmax normalisers instead of alpha
    exact_comp    the linear branch replaced by exact softmax attention over the same complement blocks: the
                  best any linear branch could do when mixed by one alpha per query block

alpha is the best per query block in closed form (least squares, clipped to [0, 1]) in every row, so the
figures compare branches, not alpha predictors. Runs on a CPU in about 10 minutes for the embedded model.
Usage: python benchmarks/linear_branch_probe.py CHECKPOINT --csv probe.csv [--steps 150]
"""

from __future__ import annotations

import argparse
import time

import torch

from sla2cli.bench.environment import git_commit
from sla2cli.devices import model_dtype
from sla2cli.files import write_csv_file
from sla2cli.ops.geometry import k_selected
from sla2cli.report.inputs import embedded_samples, family_inputs, forward_inputs, latent_grid_for, parse_resolution
from sla2cli.report.loading import load_report_target
from sla2cli.report.metrics import relative_l2_error, true_block_mass
from sla2cli.report.runner import converted_layers
from sla2cli.training.calibration import collect_calls

TIMESTEPS = (0.9, 0.5, 0.1)
VARIANTS = ("sparse_only", "phi_softmax", "phi_learned", "coarse_comp", "coarse_merged", "exact_comp")
COLUMNS = ["checkpoint", "layer", "sparsity", "variant", "rel_l2", "fit_steps", "device", "torch", "commit"]
QUERY_ROWS_PER_CHUNK = 1024


def mean_error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The report's relative L2 per (batch, head), averaged."""
    return relative_l2_error(out, dense).mean()


def blocks_of(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, ...) -> (B, H, L / block, block, ...); L is a whole number of blocks here."""
    return x.reshape(*x.shape[:2], x.shape[2] // block, block, *x.shape[3:])


def exact_branches(q, k, v, selected, block_q, block_k):
    """Softmax attention restricted to the selected key blocks (O_s) and to the rest (exact complement)."""
    scale = q.shape[-1] ** -0.5
    out_sparse, out_complement = torch.empty_like(q), torch.empty_like(q)
    for start in range(0, q.shape[2], QUERY_ROWS_PER_CHUNK):
        stop = min(q.shape[2], start + QUERY_ROWS_PER_CHUNK)
        scores = q[:, :, start:stop] @ k.transpose(-1, -2) * scale
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        mask = selected[:, :, torch.arange(start, stop) // block_q].repeat_interleave(block_k, dim=-1)
        kept, rest = weights * mask, weights * ~mask
        out_sparse[:, :, start:stop] = kept @ v / kept.sum(-1, keepdim=True)
        out_complement[:, :, start:stop] = rest @ v / rest.sum(-1, keepdim=True).clamp_min(1e-30)
    return out_sparse, out_complement


def coarse_branches(q, k, v, selected, block_q, block_k):
    """Softmax over the complement blocks' mean keys, weighted by block size, applied to their mean values;
    and that merged with the exact selected keys under one softmax (normalisers instead of alpha)."""
    scale = q.shape[-1] ** -0.5
    key_means, value_means = blocks_of(k, block_k).mean(-2), blocks_of(v, block_k).mean(-2)
    out_coarse, out_merged = torch.empty_like(q), torch.empty_like(q)
    for start in range(0, q.shape[2], QUERY_ROWS_PER_CHUNK):
        stop = min(q.shape[2], start + QUERY_ROWS_PER_CHUNK)
        kept = selected[:, :, torch.arange(start, stop) // block_q]  # (B, H, rows, T_n)
        kept_tokens = kept.repeat_interleave(block_k, dim=-1)
        block_scores = q[:, :, start:stop] @ key_means.transpose(-1, -2) * scale
        token_scores = q[:, :, start:stop] @ k.transpose(-1, -2) * scale
        shift = torch.maximum(block_scores.masked_fill(kept, -torch.inf).amax(-1, keepdim=True),
                              token_scores.masked_fill(~kept_tokens, -torch.inf).amax(-1, keepdim=True))
        block_weights = torch.exp(block_scores - shift) * ~kept * block_k
        token_weights = torch.exp(token_scores - shift) * kept_tokens
        coarse = block_weights @ value_means
        out_coarse[:, :, start:stop] = coarse / block_weights.sum(-1, keepdim=True).clamp_min(1e-30)
        out_merged[:, :, start:stop] = (coarse + token_weights @ v) / (
            block_weights.sum(-1, keepdim=True) + token_weights.sum(-1, keepdim=True))
    return out_coarse, out_merged


def linear_branch(q, k, v, unselected, block_q, block_k, map_q=None, map_k=None):
    """O_l = phi(Q) H_i / (phi(Q) z_i + eps) with H_i, z_i summed over query block i's complement;
    phi(x) = softmax(x W) over features (W = identity: what SLA2 runs)."""
    phi_q = torch.softmax(q if map_q is None else q @ map_q, dim=-1)
    phi_k = torch.softmax(k if map_k is None else k @ map_k, dim=-1)
    key_blocks = blocks_of(phi_k, block_k)
    states = key_blocks.transpose(-1, -2) @ blocks_of(v, block_k)  # h_j: (B, H, T_n, D, D)
    batch, heads, num_k_blocks, dim, _ = states.shape
    complement = unselected.float()
    comp_states = (complement @ states.reshape(batch, heads, num_k_blocks, dim * dim)).reshape(
        batch, heads, -1, dim, dim)
    comp_norms = complement @ key_blocks.sum(dim=-2)
    query_blocks = blocks_of(phi_q, block_q)
    numerator = query_blocks @ comp_states
    denominator = (query_blocks * comp_norms[:, :, :, None, :]).sum(-1, keepdim=True) + 1e-6
    return (numerator / denominator).reshape(q.shape)


def mixed_error(out_sparse, out_linear, dense, block_q):
    """Error of alpha O_s + (1 - alpha) O_l with the least-squares alpha of each query block, in [0, 1]."""
    gap, target = blocks_of(out_sparse - out_linear, block_q), blocks_of(dense - out_linear, block_q)
    alpha = ((gap * target).sum((-1, -2)) / (gap * gap).sum((-1, -2)).clamp_min(1e-12)).clamp(0, 1)
    return mean_error(out_linear + (alpha[..., None, None] * gap).reshape(out_linear.shape), dense)


def probe_layer(layer, calls, fits: int, steps: int) -> dict[str, float]:
    """Each variant's mean error on the calls after the first `fits` (those fit phi_learned's maps)."""
    block_q, block_k = layer.block_q, layer.block_k
    prepared = []
    for call in calls:
        q, k, v, dense = (t.float() for t in (call.q, call.k, call.v, call.dense))
        mass = true_block_mass(q, k, block_q=block_q, block_k=block_k, max_chunk_elements=2**26)
        top = mass.topk(k_selected(mass.shape[-1], layer.sparsity), dim=-1).indices
        selected = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
        prepared.append((q, k, v, dense, selected, *exact_branches(q, k, v, selected, block_q, block_k)))
    dim, heads = prepared[0][0].shape[-1], prepared[0][0].shape[1]
    map_q = torch.eye(dim).repeat(1, heads, 1, 1).requires_grad_(True)
    map_k = torch.eye(dim).repeat(1, heads, 1, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([map_q, map_k], lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.stack([
            mixed_error(out_s, linear_branch(q, k, v, ~selected, block_q, block_k, map_q, map_k), dense, block_q)
            for q, k, v, dense, selected, out_s, _ in prepared[:fits]
        ]).mean().backward()
        optimizer.step()
    errors: dict[str, list[torch.Tensor]] = {variant: [] for variant in VARIANTS}
    with torch.no_grad():
        for q, k, v, dense, selected, out_s, out_c in prepared[fits:]:
            errors["sparse_only"].append(mean_error(out_s, dense))
            errors["phi_softmax"].append(mixed_error(out_s, linear_branch(q, k, v, ~selected, block_q, block_k),
                                                     dense, block_q))
            errors["phi_learned"].append(mixed_error(
                out_s, linear_branch(q, k, v, ~selected, block_q, block_k, map_q, map_k), dense, block_q))
            coarse, merged = coarse_branches(q, k, v, selected, block_q, block_k)
            errors["coarse_comp"].append(mixed_error(out_s, coarse, dense, block_q))
            errors["coarse_merged"].append(mean_error(merged, dense))
            errors["exact_comp"].append(mixed_error(out_s, out_c, dense, block_q))
    return {variant: torch.stack(values).mean().item() for variant, values in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an SLA2 checkpoint folder of the embedded model (sla2 convert --out)")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps fitting phi_learned's maps per layer")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    target = load_report_target(args.checkpoint, sparsity=None, device=device, dtype=model_dtype(device))
    for model in target.components.values():
        model.requires_grad_(False)
    layers = {f"{component}:{module}": layer for (component, module), layer in converted_layers(target).items()}
    adapter = family_inputs(target.main, target.recipe)
    grid = latent_grid_for(parse_resolution(None, target.recipe), target.recipe, adapter)
    samples = embedded_samples(adapter, grid, 2, calibration=True)
    forwards = forward_inputs(adapter, samples, TIMESTEPS, seed=0, device=device, dtype=torch.float32)
    calls = collect_calls(list(target.components.values()), layers, forwards)
    meta = dict(checkpoint=args.checkpoint, fit_steps=args.steps, device="cpu", torch=torch.__version__,
                commit=git_commit())
    rows = []
    for name, layer in layers.items():
        started = time.time()
        errors = probe_layer(layer, calls[name], fits=len(TIMESTEPS), steps=args.steps)
        print(f"{name} ({time.time() - started:.0f} s): " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()),
              flush=True)
        rows += [dict(meta, layer=name, sparsity=layer.sparsity, variant=k, rel_l2=v) for k, v in errors.items()]
    means = {variant: sum(r["rel_l2"] for r in rows if r["variant"] == variant) / len(layers) for variant in VARIANTS}
    rows += [dict(meta, layer="mean", sparsity=rows[0]["sparsity"], variant=k, rel_l2=v) for k, v in means.items()]
    print("mean over layers: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    write_csv_file(args.csv, COLUMNS, rows)


if __name__ == "__main__":
    main()
