"""Per-head accuracy and sparsity metrics of SLA2 attention: pure functions of q, k, v tensors.

Everything here compares one SLA2 attention call against full softmax attention on the same q, k, v.
The full attention probabilities are never held as an L x L matrix: a few query blocks at a time,
they are reduced to the output and to per-block masses (B, H, T_m, T_n), which are small (256 x 512
per head at 32K tokens). Every metric is derived from those two results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sla2cli.flops import dense_attention_flops, sla2_head_flops
from sla2cli.ops import Routing, route, sla2_attention_routed
from sla2cli.ops.geometry import effective_sparsity, num_blocks
from sla2cli.ops.quantization import QUANT_NONE
from sla2cli.ops.reference import block_token_counts

AlphaFunction = Callable[[Routing, int], "torch.Tensor | None"]
"""Maps a routing and the sequence length to alpha (broadcastable to (B, H, T_m)), or None for 1."""

DEFAULT_CHUNK_ELEMENTS = 1 << 23  # (query, key) pairs per step of the dense scan (32 MiB if materialised)


@dataclass(frozen=True)
class DenseAttention:
    """Full softmax attention, reduced while it is computed.

    output: (B, H, L, D) softmax(Q K^T / sqrt(D)) V (None when computed without V).
    block_mass: (B, H, T_m, T_n) share of the softmax mass that key block j receives, averaged over the
    real rows of query block i (each row's masses sum to 1, so each row of block_mass does too).
    """

    output: torch.Tensor | None
    block_mass: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def key_block_indicator(
    length: int, block_k: int, width: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(L, columns) one-hot map of key token -> key block, columns padded to a multiple of `width`."""
    num_k_blocks = num_blocks(length, block_k)
    columns = num_blocks(num_k_blocks, width) * width
    block_of_key = torch.arange(length, device=device) // block_k
    return torch.nn.functional.one_hot(block_of_key, columns).to(dtype)


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for (N, L, D) tensors, through the 4-D form the fused kernels take."""
    return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def dense_attention_with_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    block_q: int,
    block_k: int,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> DenseAttention:
    """Full attention and its block masses, a few query blocks at a time.

    Why attention against a one-hot value matrix: softmax(Q K^T) @ onehot(key -> key block) is each
    row's mass per key block, and the fused attention kernels compute it without ever storing the
    probabilities. The indicator is fed `head_dim` columns at a time so that the kernels accept it.
    Query chunks hold at most about `max_chunk_elements` (query, key) pairs (never fewer than one
    query block of one head), so memory stays bounded even where no fused kernel applies. With v None
    only the block masses are computed (`output` is None): what an oracle router needs.
    """
    batch, heads, length, head_dim = q.shape
    dtype = _compute_dtype(q)
    num_q_blocks, num_k_blocks = num_blocks(length, block_q), num_blocks(length, block_k)
    flat = batch * heads
    qf = q.to(dtype).reshape(flat, length, head_dim)
    kf = k.to(dtype).reshape(flat, length, head_dim)
    vf = None if v is None else v.to(dtype).reshape(flat, length, head_dim)
    indicator = key_block_indicator(length, block_k, head_dim, dtype, q.device)
    indicator_parts = [
        indicator[:, start : start + head_dim].contiguous() for start in range(0, indicator.shape[1], head_dim)
    ]
    row_counts = block_token_counts(length, block_q, q.device).to(dtype)

    pairs_per_block = block_q * length
    blocks_per_step = max(1, min(num_q_blocks, max_chunk_elements // pairs_per_block))
    heads_per_step = 1
    if blocks_per_step == num_q_blocks:
        heads_per_step = max(1, min(flat, max_chunk_elements // (pairs_per_block * num_q_blocks)))

    output = None if vf is None else torch.empty(flat, length, head_dim, dtype=dtype, device=q.device)
    block_mass = torch.empty(flat, num_q_blocks, num_k_blocks, dtype=dtype, device=q.device)
    for head_start in range(0, flat, heads_per_step):
        head_stop = min(flat, head_start + heads_per_step)
        keys = kf[head_start:head_stop]
        columns = [part.expand(head_stop - head_start, length, head_dim) for part in indicator_parts]
        for block_start in range(0, num_q_blocks, blocks_per_step):
            block_stop = min(num_q_blocks, block_start + blocks_per_step)
            row_start, row_stop = block_start * block_q, min(length, block_stop * block_q)
            queries = qf[head_start:head_stop, row_start:row_stop]
            if output is not None:
                values = vf[head_start:head_stop]
                output[head_start:head_stop, row_start:row_stop] = _fused_attention(queries, keys, values)
            per_key_block = torch.cat([_fused_attention(queries, keys, part) for part in columns], dim=-1)
            per_key_block = per_key_block[..., :num_k_blocks]
            missing_rows = (block_stop - block_start) * block_q - (row_stop - row_start)
            per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, missing_rows))
            summed = per_key_block.reshape(head_stop - head_start, -1, block_q, num_k_blocks).sum(dim=2)
            block_mass[head_start:head_stop, block_start:block_stop] = (
                summed / row_counts[block_start:block_stop, None]
            )
    return DenseAttention(
        output=None if output is None else output.reshape(batch, heads, length, head_dim),
        block_mass=block_mass.reshape(batch, heads, num_q_blocks, num_k_blocks),
    )


def true_block_mass(
    q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """(B, H, T_m, T_n) share of each query block's softmax mass held by each key block, in bounded memory."""
    return dense_attention_with_block_mass(
        q, k, None, block_q=block_q, block_k=block_k, max_chunk_elements=max_chunk_elements
    ).block_mass


def selection_mask(lut: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Boolean (B, H, T_m, T_n) map of the key blocks a look-up table selects."""
    mask = torch.zeros(*lut.shape[:-1], num_key_blocks, dtype=torch.bool, device=lut.device)
    return mask.scatter_(-1, lut.long(), True)


def captured_mass(block_mass: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Share of the true softmax mass that falls in the selected blocks, per query block (B, H, T_m)."""
    return block_mass.gather(-1, lut.long()).sum(dim=-1)


def router_recall(block_mass: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Share of the oracle top-k_sel key blocks (ranked by true mass) that were selected, (B, H, T_m)."""
    k_sel = lut.shape[-1]
    oracle = block_mass.topk(k_sel, dim=-1).indices
    selected = selection_mask(lut, block_mass.shape[-1])
    return selected.gather(-1, oracle).to(block_mass.dtype).mean(dim=-1)


def selected_pairs(lut: torch.Tensor, length: int, block_q: int, block_k: int) -> torch.Tensor:
    """(query, key) token pairs computed by the exact branch, per (B, H); partial blocks count real tokens."""
    key_counts = block_token_counts(length, block_k, lut.device).to(torch.float64)
    row_counts = block_token_counts(length, block_q, lut.device).to(torch.float64)
    keys_per_query_block = key_counts[lut.long()].sum(dim=-1)  # (B, H, T_m)
    return (keys_per_query_block * row_counts).sum(dim=-1)


def achieved_sparsity(lut: torch.Tensor, length: int, block_q: int, block_k: int) -> torch.Tensor:
    """Share of the L x L token pairs left out of the exact branch, per (B, H)."""
    return 1.0 - selected_pairs(lut, length, block_q, block_k) / float(length * length)


def relative_l2_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """||approx - exact|| / ||exact|| over each head's (L, D) output, per (B, H)."""
    diff = (approx.to(exact.dtype) - exact).flatten(2).norm(dim=-1)
    return diff / exact.flatten(2).norm(dim=-1).clamp_min(torch.finfo(exact.dtype).tiny)


def cosine_similarity(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle between each head's flattened (L, D) outputs, per (B, H)."""
    return torch.nn.functional.cosine_similarity(approx.to(exact.dtype).flatten(2), exact.flatten(2), dim=-1)


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correlation along the last axis; NaN where either side is constant (or has one element)."""
    xc = x - x.mean(dim=-1, keepdim=True)
    yc = y - y.mean(dim=-1, keepdim=True)
    denominator = xc.norm(dim=-1) * yc.norm(dim=-1)
    correlation = (xc * yc).sum(dim=-1) / denominator
    eps = torch.finfo(x.dtype).eps
    degenerate = (denominator <= eps * eps) | (x.shape[-1] < 2)
    return correlation.masked_fill(degenerate, float("nan"))


def _alpha_per_block(alpha: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """alpha broadcast to (B, H, T_m) in the metrics dtype (None means 1: sparse branch only)."""
    if alpha is None:
        return torch.ones_like(like)
    return alpha.detach().to(like.dtype).expand_as(like)


def _routed_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, alpha: torch.Tensor | None,
    block_q: int, block_k: int, quant: str = QUANT_NONE,
) -> torch.Tensor:
    return sla2_attention_routed(q, k, v, routing.lut, alpha=alpha, block_q=block_q, block_k=block_k, quant=quant)


def lowbit_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, alpha: torch.Tensor | None,
    block_q: int, block_k: int, *, output: torch.Tensor, output_quant: str, lowbit_quant: str,
) -> torch.Tensor:
    """Relative L2 of the `lowbit_quant` output against the unquantised one, same routing and alpha, (B, H).

    `output` ran at `output_quant`; it stands in for whichever side it equals, so the comparison costs
    one extra op call (two only when the layer runs a third mode).
    """
    def at(mode: str) -> torch.Tensor:
        return output if mode == output_quant else _routed_output(q, k, v, routing, alpha, block_q, block_k, mode)

    exact = at(QUANT_NONE).to(_compute_dtype(q))
    return relative_l2_error(at(lowbit_quant), exact)


def _is_identity(matrix: torch.Tensor | None) -> bool:
    if matrix is None:
        return True
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return bool(torch.equal(matrix, eye))


@torch.no_grad()
def attention_metrics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    proj_q: torch.Tensor | None,
    proj_k: torch.Tensor | None,
    alpha_fn: AlphaFunction,
    block_q: int,
    block_k: int,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    output: torch.Tensor | None = None,
    quant: str = QUANT_NONE,
    lowbit_quant: str | None = None,
) -> dict[str, torch.Tensor]:
    """All report metrics of one SLA2 attention call, each a (B, H) float64 tensor.

    The SLA2 side uses the learned router (proj_q, proj_k) and alpha_fn; the heuristic side is the
    same call with identity router projections (the earlier pooled-score router) at the same
    sparsity, with alpha predicted from its own routing. Per-query-block quantities are reduced to
    a mean (and min/max where the report shows them) over query blocks. `output`, when given, is the
    layer's own result for these inputs (so the errors measure exactly what the model computed);
    otherwise it is computed with the op. `quant` is the concrete mode the layer ran (the heuristic
    side runs it too); a low-bit `lowbit_quant` adds `lowbit_rel_l2_vs_sla2`, that mode's output against
    the unquantised one with the layer's routing and alpha.
    """
    length, head_dim = q.shape[2], q.shape[3]
    dense = dense_attention_with_block_mass(
        q, k, v, block_q=block_q, block_k=block_k, max_chunk_elements=max_chunk_elements
    )
    routing = route(q, k, sparsity=sparsity, proj_q=proj_q, proj_k=proj_k, block_q=block_q, block_k=block_k)
    alpha = alpha_fn(routing, length)
    if output is None:
        output = _routed_output(q, k, v, routing, alpha, block_q, block_k, quant)
    mass = captured_mass(dense.block_mass, routing.lut)
    alpha_blocks = _alpha_per_block(alpha, mass)

    if _is_identity(proj_q) and _is_identity(proj_k):
        heuristic_routing, heuristic_output = routing, output
    else:
        heuristic_routing = route(q, k, sparsity=sparsity, block_q=block_q, block_k=block_k)
        heuristic_alpha = alpha_fn(heuristic_routing, length)
        heuristic_output = _routed_output(q, k, v, heuristic_routing, heuristic_alpha, block_q, block_k, quant)

    pairs = selected_pairs(routing.lut, length, block_q, block_k)
    flop_reduction = dense_attention_flops(length, head_dim) / sla2_head_flops(
        pairs, length, head_dim, routing.k_sel, block_q, block_k
    )
    num_k_blocks = num_blocks(length, block_k)
    metrics = {
        "sparsity": 1.0 - pairs / float(length * length),
        "requested_sparsity": torch.full_like(pairs, sparsity),
        "effective_sparsity": torch.full_like(pairs, effective_sparsity(num_k_blocks, sparsity)),
        "k_sel": torch.full_like(pairs, float(routing.k_sel)),
        "key_blocks": torch.full_like(pairs, float(num_k_blocks)),
        "flop_reduction": flop_reduction,
        "captured_mass": mass.mean(dim=-1),
        "captured_mass_min": mass.amin(dim=-1),
        "router_recall": router_recall(dense.block_mass, routing.lut).mean(dim=-1),
        "alpha_mean": alpha_blocks.mean(dim=-1),
        "alpha_min": alpha_blocks.amin(dim=-1),
        "alpha_max": alpha_blocks.amax(dim=-1),
        "alpha_mass_corr": pearson_correlation(alpha_blocks, mass),
        "alpha_mass_gap": (alpha_blocks - mass).abs().mean(dim=-1),
        "rel_l2_error": relative_l2_error(output, dense.output),
        "cosine": cosine_similarity(output, dense.output),
        "heuristic_captured_mass": captured_mass(dense.block_mass, heuristic_routing.lut).mean(dim=-1),
        "heuristic_router_recall": router_recall(dense.block_mass, heuristic_routing.lut).mean(dim=-1),
        "heuristic_rel_l2_error": relative_l2_error(heuristic_output, dense.output),
        "heuristic_cosine": cosine_similarity(heuristic_output, dense.output),
    }
    if lowbit_quant not in (None, QUANT_NONE):
        metrics["lowbit_rel_l2_vs_sla2"] = lowbit_error(
            q, k, v, routing, alpha, block_q, block_k, output=output, output_quant=quant, lowbit_quant=lowbit_quant
        )
    return {name: value.to(torch.float64) for name, value in metrics.items()}


METRIC_NAMES: tuple[str, ...] = (
    "sparsity",
    "requested_sparsity",
    "effective_sparsity",
    "k_sel",
    "key_blocks",
    "flop_reduction",
    "captured_mass",
    "captured_mass_min",
    "router_recall",
    "alpha_mean",
    "alpha_min",
    "alpha_max",
    "alpha_mass_corr",
    "alpha_mass_gap",
    "rel_l2_error",
    "cosine",
    "heuristic_captured_mass",
    "heuristic_router_recall",
    "heuristic_rel_l2_error",
    "heuristic_cosine",
    "lowbit_rel_l2_vs_sla2",
)
"""Column order of the report; `attention_metrics` returns these keys (the last only with a low-bit mode)."""
