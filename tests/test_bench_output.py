"""`sla2cli.bench.output`: the header, the table and its note, the written files."""

from __future__ import annotations

import dataclasses
import os

from bench_support import CPU, rows_at
from rich.console import Console

import sla2cli
from sla2cli.bench.environment import describe
from sla2cli.bench.output import header_lines, print_report, write_csv, write_json


def _printed(rows) -> str:
    console = Console(record=True, width=250)
    print_report(console, rows, describe(CPU), "bench")
    return console.export_text()


def test_table_and_note_show_the_rounding_once_where_it_happens():
    text = _printed(rows_at([0.9, 0.97]))
    header = next(line for line in text.splitlines() if "┃ provider" in line)
    assert "k_sel" in header and "eff. sparsity" in header
    assert text.count("note: sparsity is applied in whole key blocks") == 1
    note = next(line for line in text.splitlines() if line.startswith("note:"))
    assert "0.9 keeps 1 of 16 key blocks (effective_sparsity 0.938)" in note
    assert "0.97 keeps 1 of 16 key blocks (effective_sparsity 0.938)" in note
    exact = _printed(rows_at([0.5, 0.75]))  # whole numbers of blocks: nothing to say
    assert "eff. sparsity" not in exact and "note:" not in exact


def test_written_files_get_the_usual_permissions(tmp_path):
    """Written under a private temporary name, published with the permissions any new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    rows = rows_at([0.9])
    write_csv(rows, tmp_path / "rows.csv")
    write_json(rows, tmp_path / "rows.json")
    for name in ("rows.csv", "rows.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "rows.json"]


def test_the_header_names_a_commit_only_when_there_is_one():
    environment = describe(CPU)
    without = dataclasses.replace(environment, git_commit=None)
    assert "commit" not in header_lines(without)[1] and f"sla2 {sla2cli.__version__}" in header_lines(without)[1]
    with_commit = dataclasses.replace(environment, git_commit="abc1234")
    assert "commit abc1234" in header_lines(with_commit)[1]
