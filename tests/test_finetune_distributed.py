"""`sla2 finetune` under torchrun: two CPU processes (gloo, FSDP2) train like one at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import FAST, WEIGHTS, _cli

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
