"""`sla2 demo`: SLA2 against dense attention on a synthetic video-like attention pattern, on the CPU.

No model download and no GPU: Q, K, V come from smooth random fields over a (frames, height, width)
token grid, so that, as in a video diffusion transformer, each token attends mostly to its neighbours
in space and time and thinly to everything else. The table shows how close SLA2 stays to dense
attention at several sparsities, and a random choice of key blocks with the same budget shows that
the router, not the budget alone, makes it work.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer
from rich import box
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sla2cli.errors import UserError
from sla2cli.files import atomic_path
from sla2cli.ops import Routing, num_blocks, route, sla2_attention, sla2_attention_routed
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from sla2cli.ops.reference import block_token_counts
from sla2cli.ops.validation import check_head_dim, check_sparsity
from sla2cli.progress import progress_bar

GRID_SIDE = 32  # tokens per row and rows per frame: a 1024-token frame, like a small latent video
MIN_TOKENS = 256
DEFAULT_SPARSITIES = [0.9, 0.95, 0.97]


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


def grid_positions(tokens: int) -> torch.Tensor:
    """(tokens, 3) float positions (frame, row, column) in raster order; the last frame may be partial."""
    frames = math.ceil(tokens / (GRID_SIDE * GRID_SIDE))
    t, y, x = torch.meshgrid(
        torch.arange(frames), torch.arange(GRID_SIDE), torch.arange(GRID_SIDE), indexing="ij"
    )
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)[:tokens].float()


def smooth_field(
    positions: torch.Tensor, scales: torch.Tensor, features: int, gen: torch.Generator
) -> torch.Tensor:
    """Random Fourier features: f(p) . f(p') ~ exp(-|(p - p') / scales|^2 / 2), unit norm per token."""
    frequencies = torch.randn(3, features, generator=gen) / scales[:, None]
    phases = torch.rand(features, generator=gen) * 2 * math.pi
    return math.sqrt(2.0 / features) * torch.cos(positions @ frequencies + phases)


def video_like_qkv(
    tokens: int, heads: int, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (1, H, L, D) float32 with local spatio-temporal attention plus noise.

    q . k / sqrt(D) ~ sharpness * exp(-distance^2 / 2), so attention peaks on nearby tokens of nearby
    frames and spreads the rest thinly. Each head draws its own reach in frames and in tokens and its
    own sharpness; K carries a shared offset (as real keys do), which the router's smoothing removes.
    """
    gen = torch.Generator().manual_seed(seed)
    positions = grid_positions(tokens)
    low, span = torch.tensor([0.5, 1.5, 10.0]), torch.tensor([1.0, 1.5, 10.0])
    qs, ks, vs = [], [], []
    for _ in range(heads):
        frame_reach, grid_reach, sharpness = (low + span * torch.rand(3, generator=gen)).tolist()
        reach = torch.tensor([frame_reach, grid_reach, grid_reach])
        field = smooth_field(positions, reach, head_dim, gen)
        jitter = 0.3 / math.sqrt(head_dim)
        q = field + jitter * torch.randn(tokens, head_dim, generator=gen)
        k = field + jitter * torch.randn(tokens, head_dim, generator=gen)
        v = smooth_field(positions, reach * 2, head_dim, gen) * math.sqrt(head_dim)
        qs.append(q * sharpness * math.sqrt(head_dim))
        ks.append(k + 0.5 * torch.randn(head_dim, generator=gen))
        vs.append(v + 0.3 * torch.randn(tokens, head_dim, generator=gen))
    return torch.stack(qs)[None], torch.stack(ks)[None], torch.stack(vs)[None]


def random_lut(routing: Routing, seed: int) -> torch.Tensor:
    """Same k_sel per row as the router, but the key blocks drawn uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(routing.scores.shape, generator=gen)
    return noise.topk(routing.k_sel, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K
) -> torch.Tensor:
    """(B, H, T_m, T_n): dense attention probability of each key block, averaged over a query block's rows.

    Runs a few query blocks at a time, so memory stays at (rows per step) x L.
    """
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = num_blocks(length, block_q), num_blocks(length, block_k)
    step = max(1, (1 << 24) // (batch * heads * block_q * length))
    row_counts = block_token_counts(length, block_q, q.device)
    masses = []
    for first in range(0, num_q_blocks, step):
        last = min(num_q_blocks, first + step)
        start, stop = first * block_q, min(length, last * block_q)
        probs = torch.softmax(q[:, :, start:stop] @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
        probs = F.pad(probs, (0, num_k_blocks * block_k - length))
        key_sums = probs.reshape(batch, heads, stop - start, num_k_blocks, block_k).sum(dim=-1)
        key_sums = F.pad(key_sums, (0, 0, 0, (last - first) * block_q - (stop - start)))
        per_block = key_sums.reshape(batch, heads, last - first, block_q, num_k_blocks).sum(dim=3)
        masses.append(per_block / row_counts[first:last, None])
    return torch.cat(masses, dim=2)


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


def check_options(tokens: int, heads: int, head_dim: int, sparsities: list[float], repeats: int) -> None:
    """User mistakes become one-line UserErrors before any work starts."""
    if tokens < MIN_TOKENS:
        raise UserError(f"--tokens must be at least {MIN_TOKENS}, got {tokens}")
    if heads < 1:
        raise UserError(f"--heads must be at least 1, got {heads}")
    check_head_dim(head_dim, "--head-dim")
    for sparsity in sparsities:
        check_sparsity(sparsity, "--sparsity")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")


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
    block_mass = block_attention_mass(q, k)
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
            kept = float(block_mass.gather(-1, lut.long()).sum(dim=-1).mean())
            rows.append(
                DemoRow(
                    tokens=tokens, heads=heads, head_dim=head_dim, sparsity=sparsity, k_sel=routing.k_sel,
                    key_blocks=key_blocks, selection=selection, mass_kept=kept,
                    rel_l2_error=error, cosine=cosine, dense_ms=dense_ms, sla2_ms=sla2_ms,
                    speedup=dense_ms / sla2_ms, device="cpu",
                )
            )
    if progress is not None:
        progress.update(task, advance=1, description="done")
    return rows


def write_csv_atomically(path: Path, rows: list[DemoRow]) -> None:
    """Write to a temporary file beside `path`, then rename, so readers never see half a file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8", newline="")


def render_table(rows: list[DemoRow]) -> Table:
    """The rich table: one line per (sparsity, block selection); random-block lines dimmed."""
    first = rows[0]
    table = Table(
        title=f"SLA2 vs dense attention: {first.tokens} tokens ({first.key_blocks} key blocks), "
        f"{first.heads} heads, head dim {first.head_dim}; dense (torch SDPA) {first.dense_ms:.0f} ms",
        caption="CPU timings: SLA2 runs its PyTorch block-gather path here (router included); on CUDA GPUs "
        "it runs Triton kernels, so these times say nothing about GPU speed. Alpha = 1 (exact branch "
        "only; an uncalibrated converted layer starts near it). mass: share of dense attention probability inside the "
        "selected blocks.",
        box=box.SIMPLE_HEAD,
    )
    for name in ("sparsity", "k_sel", "blocks", "mass", "rel err", "cosine", "SLA2 ms", "speed-up"):
        table.add_column(name, justify="left" if name == "blocks" else "right")
    for row in rows:
        table.add_row(
            f"{row.sparsity:g}", str(row.k_sel), row.selection, f"{row.mass_kept:.3f}",
            f"{row.rel_l2_error:.4f}", f"{row.cosine:.4f}", f"{row.sla2_ms:.0f}", f"{row.speedup:.1f}x",
            style=None if row.selection == "router" else "dim",
        )
    return table


def demo(
    tokens: Annotated[
        int, typer.Option(help="Sequence length: a 32 x 32 token grid per frame, as many frames as needed.")
    ] = 8192,
    heads: Annotated[
        int, typer.Option(help="Attention heads, each with its own reach in space and time.")
    ] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dimension: 64 or 128.")] = 64,
    sparsity: Annotated[
        list[float] | None,
        typer.Option(
            help="Share of key blocks sent to the linear branch; repeat for several "
            "(default: 0.9, 0.95 and 0.97)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the synthetic Q, K, V and of the random-block baseline.")
    ] = 0,
    repeats: Annotated[
        int, typer.Option(help="Timed calls per measurement; the median is shown, after one warm-up call.")
    ] = 3,
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Also write the rows to this CSV file (snake_case columns, one row "
                     "per measurement)."),
    ] = None,
) -> None:
    """Compare SLA2 with dense attention on a synthetic video-like pattern (CPU only, nothing to download)."""
    sparsities = list(sparsity) if sparsity else list(DEFAULT_SPARSITIES)
    check_options(tokens, heads, head_dim, sparsities, repeats)
    if csv_path is not None and (csv_path.is_dir() or not csv_path.parent.is_dir()):
        raise UserError(f"--csv {csv_path}: give a file path in an existing directory")
    console = Console()
    with progress_bar(console) as progress:
        rows = run_demo(tokens, heads, head_dim, sparsities, seed, repeats, progress)
    console.print(render_table(rows))
    if csv_path is not None:
        write_csv_atomically(csv_path, rows)
        console.print(f"wrote {len(rows)} rows to {csv_path}")


def register(app: typer.Typer) -> None:
    """Add `sla2 demo` to the app."""
    app.command("demo")(demo)
