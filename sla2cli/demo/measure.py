"""The demo's measurements: dense attention once, then SLA2 with its router and with random key blocks of the
same budget at each sparsity, on the synthetic pattern; quality against dense and CPU wall time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from sla2cli.demo.pattern import video_like_qkv
from sla2cli.errors import UserError
from sla2cli.ops import Routing, num_blocks, route, sla2_attention, sla2_attention_routed
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from sla2cli.ops.validation import check_head_dim, check_positive_int, check_sparsity
from sla2cli.report.metrics import captured_mass, true_block_mass

MIN_TOKENS = 256


@dataclass(frozen=True)
class DemoRow:
    """One measurement: one sparsity, one way of choosing key blocks."""

    tokens: int
    heads: int
    head_dim: int
    sparsity: float
    k_sel: int
    key_blocks: int
    selection: str
    mass_kept: float
    rel_l2_error: float
    cosine: float
    dense_ms: float
    sla2_ms: float
    speedup: float
    device: str


def check_options(
    tokens: int, heads: int, head_dim: int, sparsities: list[float], repeats: int, csv_path: Path | None = None
) -> None:
    """User mistakes become one-line errors (exit code 2) before any work starts."""
    if tokens < MIN_TOKENS:
        raise UserError(f"--tokens must be at least {MIN_TOKENS}, got {tokens}")
    check_positive_int(heads, "--heads")
    check_head_dim(head_dim, "--head-dim")
    for sparsity in sparsities:
        check_sparsity(sparsity, "--sparsity")
    check_positive_int(repeats, "--repeats")
    if csv_path is not None and (csv_path.is_dir() or not csv_path.parent.is_dir()):
        raise UserError(f"--csv {csv_path}: give a file path in an existing directory")


def random_lut(routing: Routing, seed: int) -> torch.Tensor:
    """Same k_sel per row as the router, but the key blocks drawn uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(routing.scores.shape, generator=gen)
    return noise.topk(routing.k_sel, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def compare(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of out against reference, over all elements."""
    diff = (out.double() - reference.double()).norm() / reference.double().norm()
    cosine = F.cosine_similarity(out.double().flatten(), reference.double().flatten(), dim=0)
    return float(diff), float(cosine)


def run_demo(
    tokens: int, heads: int, head_dim: int, sparsities: list[float], seed: int, repeats: int,
    progress: Progress | None = None,
) -> list[DemoRow]:
    """Measure dense attention once, then SLA2 with its router and with random blocks at each sparsity.

    Both use the op as a converted model starts out: alpha = 1 (exact branch only), since alpha and
    the router are learned by calibration. Only the choice of key blocks differs between the two.
    """
    q, k, v = video_like_qkv(tokens, heads, head_dim, seed)
    task = progress.add_task("dense attention", total=1 + 2 * len(sparsities)) if progress else None
    dense_ms, dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    key_blocks = num_blocks(tokens, DEFAULT_BLOCK_K)
    block_mass = true_block_mass(q, k, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K)
    rows = []
    for sparsity in sparsities:
        routing = route(q, k, sparsity=sparsity)
        runs = {
            "router": (routing.lut, lambda sparsity=sparsity: sla2_attention(q, k, v, sparsity=sparsity)),
        }
        chance = random_lut(routing, seed)
        runs["random"] = (chance, lambda chance=chance: sla2_attention_routed(q, k, v, chance))
        for selection, (lut, call) in runs.items():
            if progress is not None:
                progress.update(task, advance=1, description=f"sparsity {sparsity:g}, {selection} blocks")
            sla2_ms, out = median_ms(call, repeats)
            error, cosine = compare(out, dense)
            rows.append(
                DemoRow(
                    tokens=tokens, heads=heads, head_dim=head_dim, sparsity=sparsity, k_sel=routing.k_sel,
                    key_blocks=key_blocks, selection=selection, mass_kept=float(captured_mass(block_mass, lut).mean()),
                    rel_l2_error=error, cosine=cosine, dense_ms=dense_ms, sla2_ms=sla2_ms,
                    speedup=dense_ms / sla2_ms, device="cpu",
                )
            )
    if progress is not None:
        progress.update(task, advance=1, description="done")
    return rows
