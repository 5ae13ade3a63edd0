"""benchmarks/quality_suite.py on CPU: the job matrix, worker processes, the CSV, a crashed job, the time budget,
and the shipped form it writes."""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from sla2cli.embedded.shipped_sla2 import load_shipped_sla2, shipped_sla2_record

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("quality_suite", ROOT / "benchmarks" / "quality_suite.py")
suite = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = suite  # dataclasses look their module up by name
SPEC.loader.exec_module(suite)

CRASH = "print('worker blew up'); raise SystemExit(3)"


def _settings(tmp_path: Path, **overrides) -> suite.SuiteSettings:
    values = dict(steps=2, learning_rate=3e-4, batch_size=2, clip=(2, 16, 16), device="cpu", out=tmp_path / "scratch",
                  validation_samples=1, router_steps=3, alpha_steps=3, threads=1)
    return suite.SuiteSettings(**{**values, **overrides})


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames), list(reader)


def test_matrices():
    sparsities = [0.9, 0.95, 0.97]
    full = suite.build_jobs(list(suite.TRAINED_METHODS), sparsities, "full")
    assert full[0] == suite.Job("dense", 0.0) and len(full) == 1 + 7 * 3
    acceptance = suite.build_jobs(list(suite.METHODS), sparsities, "acceptance")
    assert [job.name for job in acceptance] == [
        "dense", "sparse_only-0.97", "heuristic-0.97", "sla_proj-0.97", "sla2-0.9", "sla2-0.95", "sla2-0.97",
        "oracle_router-0.97", "exact_rest-0.97", "oracle_exact-0.97",
    ]
    with pytest.raises(suite.UserError, match="unknown attention method"):
        suite.build_jobs(["sla3"], sparsities, "full")
    with pytest.raises(suite.UserError, match="--sparsities must lie in"):
        suite.parse_sparsities("0.9,1.2")


def test_calibration_clips_come_from_the_command_line_and_must_be_positive(tmp_path):
    jobs = suite.build_jobs(["sla2"], [0.97], "full")
    arguments = ["--device", "cpu", "--out", str(tmp_path)]
    settings = suite.settings_from_args(suite.parser().parse_args([*arguments, "--calibration-clips", "3"]), jobs)
    assert settings.calibration_clips == 3
    assert suite.settings_from_args(suite.parser().parse_args(arguments), jobs).calibration_clips is None
    with pytest.raises(suite.UserError, match="--calibration-clips must be at least 1"):
        suite.settings_from_args(suite.parser().parse_args([*arguments, "--calibration-clips", "0"]), jobs)


def test_suite_writes_one_row_per_job_a_crash_as_failed_and_the_shipped_form(tmp_path):
    jobs = suite.build_jobs(["sla2", "sparse_only"], [0.97], "full")
    settings = _settings(tmp_path, ship=tmp_path / "ship", ship_sparsity=0.97, deadline=time.time() + 600)

    def command(job: suite.Job, spec: Path) -> list[str]:
        if job.method == "sparse_only":
            return [sys.executable, "-c", CRASH]
        return suite.default_worker_command(job, spec)

    result_csv = tmp_path / "results" / "quality_embedded.csv"
    result = suite.run_suite(jobs, settings, parallel=2, result_csv=result_csv,
                             console=Console(file=io.StringIO()), worker_command=command)

    columns, rows = _read(result_csv)
    assert columns[:len(suite.COLUMNS)] == suite.COLUMNS
    assert {"val_loss_16f", "dense_val_loss_16f", "ratio_vs_dense_16f", "peak_memory_gb", "torch", "triton"} <= set(
        columns)
    assert [(row["method"], float(row["sparsity"])) for row in rows] == [
        ("dense", 0.0), ("sla2", 0.97), ("sparse_only", 0.97)]
    dense, sla2, crashed = rows
    for row in (dense, sla2):
        assert row["status"] == "ok" and row["finetune_steps"] == "2" and row["device"] == "cpu"
        assert float(row["dense_val_loss"]) == float(dense["val_loss"])
        assert float(row["ratio_vs_dense"]) == pytest.approx(float(row["val_loss"]) / float(dense["val_loss"]),
                                                             rel=1e-4)
        assert float(row["ratio_vs_dense_16f"]) == pytest.approx(
            float(row["val_loss_16f"]) / float(dense["val_loss_16f"]), rel=1e-4)
        assert row["clip_16f"] == "4x16x16" and float(row["minutes"]) > 0
    assert dense["calibrate_steps"] == "0" and sla2["calibrate_steps"] == str(3 + 3 + 3)
    assert float(sla2["val_loss_converted"]) != float(dense["val_loss_converted"])
    assert crashed["status"] == "failed" and crashed["val_loss"] == ""
    assert "code 3" in crashed["error"] and "worker blew up" in crashed["error"]

    record = shipped_sla2_record(tmp_path / "ship")
    figures = record["measurements"]
    assert figures["shipped_val_loss"] == pytest.approx(float(sla2["shipped_val_loss"]), rel=1e-4)
    assert figures["dense_reference_val_loss"] == pytest.approx(float(dense["val_loss"]), rel=1e-4)
    assert figures["untrained_conversion_val_loss"] == pytest.approx(float(sla2["val_loss_converted"]), rel=1e-4)
    assert figures["finetune_steps"] == 2 and record["sparsity"] == 0.97
    assert result.shipped == record
    load_shipped_sla2(assets_dir=tmp_path / "ship")


def test_a_job_past_its_time_budget_stops_and_says_so(tmp_path):
    row = suite.run_job(suite.Job("sparse_only", 0.97), _settings(tmp_path, deadline=time.time()))
    assert row["finetune_steps"] == 1  # the step under way finishes, then the loop stops
    assert row["status"] == "stopped at step 1 of 2 (time budget)"
    assert row["val_loss"] > 0 and row["val_loss_16f"] > 0
