"""benchmarks/memory_breakdown.py: the line fit, the extrapolation, and a run at tiny sizes on CPU."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling finetune_gpu
SPEC = importlib.util.spec_from_file_location("memory_breakdown", ROOT / "benchmarks" / "memory_breakdown.py")
breakdown = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(breakdown)


def test_line_through_recovers_a_line():
    intercept, slope = breakdown.line_through([(1, 13.0), (2, 18.0), (4, 28.0)])
    assert intercept == pytest.approx(8.0) and slope == pytest.approx(5.0)


def test_extrapolation_to_full_depth_and_fsdp2_estimates():
    """Lines through the depths; the larger of the two moments of a step, plus the working memory."""
    gib = breakdown.GIB
    # 2 + n/4 Gi parameters (16 B each: 32 + 4n GB), peak 40 + 4n GB, so 8 GB of working memory at every depth;
    # a training forward leaves 0.5 + n GB of checkpointed inputs.
    measured = [{"layers": n, "parameters": 2 * gib + gib // 4 * n, "peak_gb": 40.0 + 4.0 * n, "rest_gb": 8.0,
                 "forward_held_gb": 0.5 + 1.0 * n} for n in (1, 2, 4)]
    rows = breakdown.extrapolate(measured, full_depth=40, gpu_counts=[2, 8], capacity_gb=140.0)
    assert [row["gpus"] for row in rows] == [1, 2, 8] and all(row["kind"] == "extrapolated" for row in rows)
    parameters_gib, held = 12, 0.5 + 40
    assert rows[0]["parameters"] == parameters_gib * gib and rows[0]["forward_held_gb"] == pytest.approx(held)
    # One GPU: the end of the backward (192 GB of state) outweighs its start (144 + 40.5).
    assert rows[0]["peak_gb"] == pytest.approx(16 * parameters_gib + 8.0) and rows[0]["note"].startswith("end")
    # Eight: the unsharded checkpointed inputs make the start the larger.
    gathered = breakdown.GATHERED_BLOCKS * 0.25 * 4  # two blocks of 2^30 / 4 float32 parameters
    assert rows[2]["peak_gb"] == pytest.approx(12 * parameters_gib / 8 + held + 8.0 + gathered)
    assert rows[2]["note"].startswith("start")


def test_tiny_run_on_cpu_writes_measured_and_extrapolated_rows(tmp_path, monkeypatch):
    out = tmp_path / "memory.csv"
    monkeypatch.setattr(sys, "argv", [
        "memory_breakdown.py", "--device", "cpu", "--scaled-down", "--latents", "16,2,16,16", "--text", "16,32",
        "--layers", "1", "2", "--steps", "1", "--gpus", "2", "--csv", str(out), "--work", str(tmp_path / "work"),
    ])
    breakdown.main()
    rows = list(csv.DictReader(out.open()))
    assert [(row["kind"], row["layers"], row["gpus"]) for row in rows] == [
        ("measured", "1", "1"), ("measured", "2", "1"), ("extrapolated", "40", "1"), ("extrapolated", "40", "2")]
    assert int(rows[1]["parameters"]) > int(rows[0]["parameters"]) > 0
    assert float(rows[0]["seconds_per_step"]) > 0


def test_one_depth_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["memory_breakdown.py", "--layers", "2", "2", "--csv", "x.csv"])
    with pytest.raises(SystemExit) as stopped:
        breakdown.main()
    assert stopped.value.code == 2 and "two or more" in capsys.readouterr().err
