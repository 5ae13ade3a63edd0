"""Showing and saving results: a rich table with a header, CSV and JSON files written atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from sla2cli.bench.environment import Environment
from sla2cli.bench.records import OK, Measurement, column_order
from sla2cli.files import atomic_path, write_json_file
from sla2cli.ops.geometry import ROUNDING_NOTE, describe_rounding, sparsity_is_rounded

CPU_WARNING = (
    "warning: running on CPU: these are NOT GPU numbers (small shapes, PyTorch block-gather path); "
    "use them only to compare providers on this CPU"
)


INTEGER_COLUMNS = ("repeats", "k_sel", "key_blocks")


def rows_frame(measurements: list[Measurement]) -> pd.DataFrame:
    """The rows as a table; integer columns stay integers where some rows leave them empty."""
    rows = [m.as_row() for m in measurements]
    frame = pd.DataFrame(rows, columns=column_order(rows))
    for column in INTEGER_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    return frame


def write_csv(measurements: list[Measurement], path: Path) -> None:
    frame = rows_frame(measurements)
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def write_json(measurements: list[Measurement], path: Path) -> None:
    """A JSON list with one object per measurement (null where a CSV cell is empty)."""
    write_json_file(path, [m.as_row() for m in measurements])


def header_lines(environment: Environment) -> list[str]:
    e = environment
    lines = [
        f"device: {e.device}   gpu: {e.gpu}   driver: {e.driver}",
        f"torch {e.torch_version} (cuda {e.cuda_version})   triton {e.triton_version}   "
        f"sla2 {e.sla2_version}" + (f"   commit {e.git_commit}" if e.git_commit else ""),
    ]
    if e.device != "cuda":
        lines.append(CPU_WARNING)
    return lines


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rounded_cases(measurements: list[Measurement]) -> dict[str, list[tuple[int, float]]]:
    """Per shape, the (key blocks, requested sparsity) whose effective sparsity differs visibly."""
    cases: dict[str, list[tuple[int, float]]] = {}
    for m in measurements:
        if m.sparsity is None or m.key_blocks is None or not sparsity_is_rounded(m.key_blocks, m.sparsity):
            continue
        case = (m.key_blocks, m.sparsity)
        if case not in cases.setdefault(m.shape, []):
            cases[m.shape].append(case)
    return cases


def rounding_note(measurements: list[Measurement]) -> str | None:
    """One line saying how the requested sparsities were rounded to whole key blocks (None if nowhere)."""
    cases = rounded_cases(measurements)
    if not cases:
        return None
    per_shape = [
        f"at {shape}, " + ", ".join(describe_rounding(blocks, sparsity) for blocks, sparsity in levels)
        for shape, levels in cases.items()
    ]
    return f"note: {ROUNDING_NOTE}: {'; '.join(per_shape)}"


def results_table(measurements: list[Measurement], title: str) -> Table:
    """Numbers only; what each provider times goes in the legend, skip reasons in the last column.

    Where a requested sparsity was rounded to whole key blocks, k_sel and the effective sparsity
    stand beside it."""
    rounded = bool(rounded_cases(measurements))
    table = Table(title=title, title_justify="left")
    for name in ("provider", "shape", "sparsity", *(("k_sel", "eff. sparsity") if rounded else ()), "mode"):
        table.add_column(name, no_wrap=True)
    for name in ("median ms", "vs FA2", "dense TFLOP/s", "sparse TFLOP/s", "peak MB"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for m in measurements:
        budget = (str(m.k_sel) if m.k_sel is not None else "-", _number(m.effective_sparsity, ".3f"))
        table.add_row(
            m.provider,
            m.shape,
            "dense" if m.sparsity is None else f"{m.sparsity:g}",
            *(budget if rounded else ()),
            m.mode,
            _number(m.median_ms, ".4g"),
            "-" if m.speedup_vs_fa2 is None else f"{m.speedup_vs_fa2:.2f}x",
            _number(m.dense_tflops, ".3g"),
            _number(m.sparse_tflops, ".3g"),
            _number(m.peak_mem_mb, ".0f"),
            "ok" if m.status == OK else f"[yellow]{m.status}: {m.note}[/]",
        )
    return table


def legend_lines(measurements: list[Measurement]) -> list[str]:
    """One line per timed provider saying what its time covers (e.g. flex: sparse part only)."""
    notes = dict.fromkeys((m.provider, m.note) for m in measurements if m.status == OK)
    return [f"{provider}: {note}" for provider, note in notes]


REPORT_WIDTH_WITHOUT_TERMINAL = 160


def report_console() -> Console:
    """stdout; when it is not a terminal (a log file), wide enough that no number is cut."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, REPORT_WIDTH_WITHOUT_TERMINAL))


def print_report(
    console: Console, measurements: list[Measurement], environment: Environment, title: str
) -> None:
    for line in header_lines(environment):
        style = "bold yellow" if line == CPU_WARNING else None
        console.print(line, style=style, highlight=False, soft_wrap=True)
    console.print(results_table(measurements, title))
    note = rounding_note(measurements)
    if note is not None:
        console.print(note, highlight=False, soft_wrap=True)
    for line in legend_lines(measurements):
        console.print(line, highlight=False, soft_wrap=True)
    if environment.device != "cuda":
        console.print(CPU_WARNING, style="bold yellow", highlight=False, soft_wrap=True)
