"""The demo's table and CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.table import Table

from sla2cli.demo.measure import DemoRow
from sla2cli.files import atomic_path


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
