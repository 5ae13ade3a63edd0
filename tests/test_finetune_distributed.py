"""`sla2 finetune` under torchrun: two CPU processes (gloo, FSDP2) train like one at the same global batch, and
a rank killed mid-run resumes from the last save with the same losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import FAST, WEIGHTS, _cli, wait_for_first_save

import sla2cli
from sla2cli.checkpoint.format import TRAINING_METRICS_FILE, read_config
from sla2cli.training.metrics import read_metrics_csv, train_losses


def test_two_processes_train_like_one(tmp_path):
    converted = tmp_path / "c"
    sla2cli.save(sla2cli.load(None, sparsity=0.9), converted)
    args = ["finetune", str(converted), "--steps", "5", "--save-every", "3", *FAST]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sla2cli", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _cli([*args, "--out", str(tmp_path / "one")]) == 0

    one, two = (train_losses(read_metrics_csv(tmp_path / name / TRAINING_METRICS_FILE)) for name in ("one", "two"))
    assert len(one) == len(two) == 5
    assert one == pytest.approx(two, rel=1e-4)
    config = read_config(tmp_path / "two")
    assert config.components["transformer"].model_class == "WanTransformer3DModel"
    assert config.measurements["finetune_steps"] == 5
    weights = [load_file(str(tmp_path / name / WEIGHTS)) for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=1e-5)
    model = sla2cli.load(tmp_path / "two")
    assert sla2cli.evaluate(model, clip=(2, 16, 16), validation_samples=2) == pytest.approx(
        read_metrics_csv(tmp_path / "one" / TRAINING_METRICS_FILE)[-1]["loss"], rel=1e-3)


TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sla2cli"]


def _descendants(pid: int) -> list[int]:
    """Every process below pid, from Linux's /proc/PID/task/PID/children lists."""
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(child) for child in children_file.read_text().split()] if children_file.exists() else []
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _ranks(agent: int) -> list[int]:
    """The worker processes torchrun started: the descendants that run sla2cli."""
    ranks = []
    for pid in _descendants(agent):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"sla2cli" in command:
            ranks.append(pid)
    return ranks


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="finds torchrun's ranks through Linux's /proc")
def test_a_rank_killed_after_a_save_resumes_with_the_same_losses(tmp_path):
    converted = tmp_path / "c"
    sla2cli.save(sla2cli.load(None, sparsity=0.9), converted)
    args = ["finetune", str(converted), "--steps", "12", "--save-every", "3", *FAST]
    out = tmp_path / "killed"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([*TORCHRUN_TWO, *args, "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=environment)
    state = wait_for_first_save(agent, out)
    ranks = _ranks(agent.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    agent.communicate(timeout=300)
    assert agent.returncode != 0  # the run died before its 12 steps
    saved_step = json.loads(state.read_text())["step"]
    assert 3 <= saved_step < 12
    saved_rows = read_metrics_csv(out / TRAINING_METRICS_FILE)
    resumed = subprocess.run([*TORCHRUN_TWO, *args, "--out", str(out), "--resume"], capture_output=True, text=True,
                             timeout=600, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _cli([*args, "--out", str(tmp_path / "one")]) == 0

    one, two = (train_losses(read_metrics_csv(folder / TRAINING_METRICS_FILE)) for folder in (tmp_path / "one", out))
    assert len(one) == len(two) == 12  # every step once: the steps run after the last save were redone, not kept
    # The resumed run continued from the save: the rows up to it are the killed run's own (their timings too).
    assert read_metrics_csv(out / TRAINING_METRICS_FILE)[: len(saved_rows)] == saved_rows
    assert max(int(row["step"]) for row in saved_rows) == saved_step
    assert two == pytest.approx(one, rel=1e-4)
    assert read_config(out).measurements["finetune_steps"] == 12
