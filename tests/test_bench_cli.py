"""`sla2 bench` end to end through the entry point: mistakes, exit codes, files written."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pandas as pd
import pytest
from bench_support import Crashes, exit_code, installed, rounded

import sla2cli.bench.providers.sparse as sparse
from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD
from sla2cli.bench.providers.dense import DefaultSdpa
from sla2cli.bench.records import FAILED, OK, REQUIRED_COLUMNS, SKIPPED

pytestmark = pytest.mark.usefixtures("one_thread", "wide_console")



@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "1,2,512"], "--shape"),
        (["--shape", "1,2,x,64"], "--shape"),
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.5"], "--sparsity"),
        (["--provider", "nope"], "--provider 'nope' is unknown"),
        (["--mode", "bwd"], "--mode"),
        (["--dtype", "int8"], "--dtype"),
        (["--train-step", "--frames", "9"], "--frames, --train-step belong to model mode"),
    ],
)
def test_bad_options_give_one_line_and_exit_code_2(argv, message, capsys):
    assert exit_code(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option, name", [("--csv", "rows.txt"), ("--json", "rows.csv"), ("--plot", "folder.png")])
def test_output_files_are_checked_before_any_timing(tmp_path, capsys, option, name):
    (tmp_path / "folder.png").mkdir()
    assert exit_code(["bench", "--provider", "sla2", "--shape", "1,2,512,64", option, str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert option in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


def test_a_missing_provider_named_explicitly_exits_2(capsys):
    if installed("sageattention"):
        pytest.skip("sageattention is installed here")
    assert exit_code(["bench", "--provider", "sage", "--shape", "1,2,512,64"]) == 2
    assert "pip install sageattention" in capsys.readouterr().err


def test_a_wrong_kernel_fails_the_command(monkeypatch, capsys):
    monkeypatch.setattr(sparse, "sla2_attention", lambda q, k, v, **kw: v * 1.0)
    code = exit_code(["bench", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd"])
    assert code == 1
    captured = capsys.readouterr()
    assert "sla2: output differs" in captured.err and "median" not in captured.out


def test_a_peer_crash_is_reported_as_a_warning_after_writing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(DefaultSdpa, "attention", Crashes.attention)
    csv = tmp_path / "rows.csv"
    argv = ["bench", "--provider", "sdpa", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd",
            "--sparsity", "0.9", "--csv", str(csv)]
    assert exit_code(argv) == 0
    assert "warning: sdpa raised errors" in capsys.readouterr().err
    frame = pd.read_csv(csv).set_index("provider")
    assert frame.loc["sdpa", "status"] == FAILED and frame.loc["sla2", "status"] == OK


def test_a_crash_of_sla2_exits_1_after_writing(monkeypatch, tmp_path, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sparse, "sla2_attention", crash)
    csv = tmp_path / "rows.csv"
    argv = ["bench", "--provider", "sla2", "--shape", "1,2,512,64", "--mode", "fwd", "--sparsity", "0.9",
            "--csv", str(csv)]
    assert exit_code(argv) == 1
    assert "error: sla2 raised errors" in capsys.readouterr().err
    assert pd.read_csv(csv).set_index("provider").loc["sla2", "status"] == FAILED


def test_help_documents_every_option(capsys):
    assert exit_code(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--shape", "--sparsity", "--mode", "--provider", "--dtype", "--device", "--warmup",
                   "--repeats", "--time-budget", "--seed", "--csv", "--json", "--plot", "--model",
                   "--resolution", "--frames", "--random-weights", "--scaled-down", "--train-step"):
        assert option in text, option


def test_cpu_run_writes_csv_json_plot(tmp_path):
    csv, js, png = tmp_path / "bench.csv", tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        ["sla2", "bench", "--shape", "1,2,512,64", "--csv", str(csv), "--json", str(js), "--plot", str(png)],
        capture_output=True, text=True, timeout=180,
        # One intra-op thread: on a busy 2-core machine, spinning OpenMP threads make every small op
        # wait for a descheduled sibling, which measures the machine's load, not the command.
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "NOT GPU numbers" in done.stdout

    frame = pd.read_csv(csv)
    assert tuple(frame.columns[: len(REQUIRED_COLUMNS)]) == REQUIRED_COLUMNS
    assert set(frame["device"]) == {"cpu"}
    timed = frame[frame["status"] == OK]
    assert set(timed["provider"]) == {"sdpa", "sla2", "sla2-lowbit", "sla2-routing"}
    assert set(timed.set_index("provider").loc[["sla2-lowbit"], "quant"]) == {"int8"}  # auto on a CPU
    assert set(timed.set_index("provider").loc[["sla2"], "quant"]) == {"none"}
    assert timed.set_index("provider").loc[["sdpa"], "quant"].isna().all()
    assert (timed.set_index("provider").loc[["sla2-lowbit"], "rel_l2_vs_sla2"] > 0).all()
    assert (timed["median_ms"] > 0).all()
    assert timed["speedup_vs_fa2"].isna().all()  # FA2 cannot run on a CPU
    sla2_rows = frame[frame["provider"] == "sla2"]
    for _, row in sla2_rows.iterrows():
        assert (row["k_sel"], row["key_blocks"]) == (rounded(row["sparsity"], 8)[0], 8)  # 512 tokens
        assert row["effective_sparsity"] == pytest.approx(rounded(row["sparsity"], 8)[1])
    assert sorted(zip(sla2_rows["sparsity"], sla2_rows["mode"], strict=True)) == sorted(
        (s, m) for s in (0.9, 0.95, 0.97) for m in (FORWARD, FORWARD_BACKWARD)
    )
    flops = 4 * 2 * 512**2 * 64
    sdpa_fwd = timed[(timed["provider"] == "sdpa") & (timed["mode"] == FORWARD)].iloc[0]
    assert sdpa_fwd["dense_tflops"] == pytest.approx(flops / (sdpa_fwd["median_ms"] * 1e-3) / 1e12, rel=1e-6)
    skipped = frame[frame["status"] == SKIPPED].set_index(["provider", "mode"])
    assert skipped.loc[("fa2", FORWARD), "note"] == "needs a CUDA GPU"
    assert "not installed" in skipped.loc[("sage", FORWARD), "note"] or installed("sageattention")

    rows = json.loads(js.read_text())
    assert len(rows) == len(frame) and list(rows[0])[: len(REQUIRED_COLUMNS)] == list(REQUIRED_COLUMNS)
    assert rows[0]["speedup_vs_fa2"] is None and not any(
        isinstance(v, float) and math.isnan(v) for row in rows for v in row.values()
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bench.csv", "bench.json", "bench.png"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model", "--random-weights"], "unknown recipe"),
        (["--model", "embedded", "--random-weights", "--shape", "1,2,512,64"], "kernel mode"),
        (["--model", "embedded", "--random-weights", "--resolution", "big"], "--resolution"),
        (["--model", "embedded", "--scaled-down"], "--random-weights"),
    ],
)
def test_model_mode_mistakes_exit_2(argv, message, capsys):
    assert exit_code(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
