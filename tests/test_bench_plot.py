"""`sla2cli.bench.plot`: the speed-up or time figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from bench_support import rounded, rows_at

from sla2cli.bench.cases import FORWARD
from sla2cli.bench.kernel_mode import fill_speedups
from sla2cli.bench.plot import speedup_figure, write_plot
from sla2cli.bench.records import SKIPPED, Measurement


def test_plot_draws_speedups_or_times(tmp_path):
    rows = [
        Measurement("fa2", "s", None, FORWARD, median_ms=10.0),
        Measurement("sla2", "s", 0.9, FORWARD, median_ms=2.0),
        Measurement("sla2", "s", 0.97, FORWARD, median_ms=1.0),
        Measurement("flex", "s", 0.9, FORWARD, status=SKIPPED, note="needs a CUDA GPU"),
    ]
    fill_speedups(rows)
    write_plot(rows, tmp_path / "speed.png", cpu_numbers=False)
    write_plot(rows[1:], tmp_path / "times.png", cpu_numbers=True)
    for name in ("speed.png", "times.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.png", "times.png"]  # no temp files left


def test_plot_puts_points_at_the_effective_sparsity_and_names_k_sel():
    rows = rows_at([0.8, 0.9, 0.97])
    figure = speedup_figure(rows, cpu_numbers=True)
    try:
        axis = figure.axes[0]
        sla2_line = next(line for line in axis.get_lines() if line.get_label() == "sla2")
        expected = sorted(rounded(s, 16)[1] for s in (0.8, 0.9, 0.97))
        assert list(sla2_line.get_xdata()) == pytest.approx(expected)
        labels = [tick.get_text() for tick in axis.get_xticklabels()]
        assert "0.938\nk_sel 1" in labels and "0.812\nk_sel 3" in labels
        assert "requested 0.9, 0.97 -> 0.938 (k_sel 1 of 16)" in axis.get_title()
        assert axis.get_xlabel().startswith("effective sparsity")
    finally:
        plt.close(figure)
