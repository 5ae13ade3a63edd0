"""`sla2 demo`: SLA2 against dense attention on a synthetic video-like attention pattern, on the CPU.

No model download and no GPU (the computation is `sla2cli.demo`). The table shows how close SLA2 stays
to dense attention at several sparsities, and a random choice of key blocks with the same budget shows
that the router, not the budget alone, makes it work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.demo.measure import check_options, run_demo
from sla2cli.demo.output import render_table, write_csv_atomically
from sla2cli.ops.geometry import DEFAULT_SPARSITIES
from sla2cli.progress import progress_bar


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
    check_options(tokens, heads, head_dim, sparsities, repeats, csv_path)
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
