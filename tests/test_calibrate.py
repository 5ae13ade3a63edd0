"""`sla2 calibrate`: capture, per-layer training, the written checkpoint, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_hub import assert_user_error, folder_listing, run_cli
from safetensors.torch import load_file

from sla2cli import api
from sla2cli.models.conversion import sla2_layers
from sla2cli.report.inputs import embedded_samples, family_inputs, forward_inputs
from sla2cli.report.loading import load_report_target
from sla2cli.training.calibration import (
    CalibrationSettings,
    calibrate_layers,
    collect_calls,
    mean_hard_error,
)

SMALL_CLIP = "2x32x32"  # latent frames x height x width: 512 tokens, 4 query blocks, 8 key blocks
SMALL_GRID = (2, 32, 32)
FAST = ["--resolution", SMALL_CLIP, "--timesteps", "0.9,0.1", "--query-blocks", "2", "--quiet"]
ATTENTION_FILE = "sla2_attention.safetensors"


@pytest.fixture()
def checkpoint(embedded_model, tmp_path, capsys) -> Path:
    """The embedded model converted at its recipe's sparsity (0.97), as `sla2 convert` writes it."""
    folder = tmp_path / "embedded-sla2"
    code, _, err = run_cli(["convert", "--out", str(folder)], capsys)
    assert code == 0, err
    return folder


def _small_calls(folder: Path):
    target = load_report_target(str(folder), sparsity=None, device=torch.device("cpu"), dtype=torch.float32)
    adapter = family_inputs(target.main, target.recipe)
    samples = embedded_samples(adapter, SMALL_GRID, 1)
    forwards = forward_inputs(adapter, samples, (0.9, 0.1), seed=0, device=torch.device("cpu"), dtype=torch.float32)
    layers = sla2_layers(target.main)
    return target, layers, collect_calls([target.main], layers, forwards)


def test_capture_records_dense_attention_inputs(checkpoint):
    target, layers, calls = _small_calls(checkpoint)
    assert set(calls) == set(layers) and all(len(found) == 2 for found in calls.values())
    assert all("forward" not in vars(layer) for layer in layers.values())  # hooks removed
    call = calls[next(iter(layers))][0]
    assert call.q.shape == (1, 4, 512, 64)
    dense = torch.nn.functional.scaled_dot_product_attention(call.q, call.k, call.v)
    torch.testing.assert_close(call.dense, dense)
    layer = layers[next(iter(layers))]
    error = ((layer(call.q, call.k, call.v) - dense).norm() / dense.norm()).item()
    assert mean_hard_error(layer, [call]) == pytest.approx(error, rel=1e-5)
    assert error > 0.01  # 97% sparsity at 512 tokens keeps one key block of eight: far from dense


def test_training_lowers_every_layers_soft_loss_and_touches_only_sla2_parameters(checkpoint):
    target, layers, calls = _small_calls(checkpoint)
    base_before = {name: p.clone() for name, p in target.main.named_parameters() if ".sla2." not in name}
    sla2_before = {name: [p.clone() for p in layer.parameters()] for name, layer in layers.items()}
    results = calibrate_layers(layers, calls, CalibrationSettings(steps=12, query_blocks=4))
    assert [result.name for result in results] == list(layers)
    assert any(result.kept for result in results)
    for result in results:
        assert result.trained
        assert result.soft_loss_after < result.soft_loss_before, result
        layer = layers[result.name]
        unchanged = all(torch.equal(a, b) for a, b in zip(sla2_before[result.name], layer.parameters(), strict=True))
        assert unchanged != result.kept  # kept: trained values; not kept: restored exactly
        assert result.kept == (result.rel_l2_after <= result.rel_l2_before)
        assert mean_hard_error(layer, calls[result.name]) == pytest.approx(result.rel_l2_final, rel=1e-5)
        assert all(not p.requires_grad and p.grad is None for p in layer.parameters())
    for name, p in target.main.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name


def test_cli_writes_a_loadable_calibrated_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "calibrated"
    code, stdout, err = run_cli(["calibrate", str(checkpoint), "--out", str(out), "--steps", "6", *FAST], capsys)
    assert code == 0, err
    assert "rel L2" in stdout and "blocks.0.attn1" in stdout and "blocks.3.attn1" in stdout
    before, after = load_file(str(checkpoint / ATTENTION_FILE)), load_file(str(out / ATTENTION_FILE))
    assert before.keys() == after.keys()
    changed_layers = {key.rsplit(".", 1)[0] for key in before if not torch.equal(before[key], after[key])}
    config = json.loads((out / "sla2_config.json").read_text(encoding="utf-8"))
    assert config["base_weights"] == "referenced"
    figures = config["measurements"]
    assert figures["calibration_steps_per_layer"] == 6
    assert figures["calibration_soft_loss_after"] < figures["calibration_soft_loss_before"]
    assert figures["calibration_rel_l2_after"] <= figures["calibration_rel_l2_before"]
    assert len(changed_layers) == figures["calibration_layers_kept"] >= 1
    assert all(key.endswith(".proj_q") or ".alpha_" in key or key.endswith(".proj_k")
               for key in before if key.rsplit(".", 1)[0] in changed_layers)
    model = api.load(out)
    loaded = {name: layer.proj_q for name, layer in sla2_layers(model).items()}
    key = next(k for k in after if k.endswith("proj_q"))
    assert any(torch.equal(after[key], proj) for proj in loaded.values())


def test_cli_overwrites_in_place_only_when_asked(checkpoint, capsys):
    original = load_file(str(checkpoint / ATTENTION_FILE))
    code, _, err = run_cli(["calibrate", str(checkpoint), "--overwrite", "--steps", "6", *FAST], capsys)
    assert code == 0, err
    updated = load_file(str(checkpoint / ATTENTION_FILE))
    assert any(not torch.equal(original[key], updated[key]) for key in original)
    config = json.loads((checkpoint / "sla2_config.json").read_text(encoding="utf-8"))
    assert "calibration_layers_kept" in config["measurements"]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--steps", "0"], "--steps"),
        (["--timesteps", "0.9,abc"], "--timesteps"),
        (["--timesteps", "1.5"], "--timesteps"),
        (["--lr", "0"], "--lr"),
        (["--query-blocks", "0"], "--query-blocks"),
        (["--clips", "0"], "--clips"),
        (["--tau", "0"], "--tau"),
    ],
)
def test_bad_options(checkpoint, tmp_path, args, mentions, capsys):
    out = tmp_path / "never"
    code, _, err = run_cli(["calibrate", str(checkpoint), "--out", str(out), *args], capsys)
    assert_user_error(code, err, mentions=mentions)
    assert not out.exists()


def test_output_rules(checkpoint, tmp_path, capsys):
    listing = folder_listing(checkpoint)
    code, _, err = run_cli(["calibrate", str(checkpoint), "--steps", "1"], capsys)
    assert_user_error(code, err, mentions="--out")
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = run_cli(["calibrate", str(checkpoint), "--out", str(existing), "--steps", "1"], capsys)
    assert_user_error(code, err, mentions="--overwrite")
    assert folder_listing(checkpoint) == listing and not any(existing.iterdir())


def test_overwrite_in_place_keeps_a_users_file(checkpoint, tmp_path, monkeypatch, capsys):
    (checkpoint / "notes.txt").write_text("mine")
    listing = folder_listing(tmp_path)
    code, _, err = run_cli(["calibrate", str(checkpoint), "--overwrite", "--steps", "1", *FAST], capsys)
    assert_user_error(code, err, mentions=r"notes\.txt, which sla2 did not write")
    monkeypatch.chdir(checkpoint)
    code, _, err = run_cli(["calibrate", ".", "--overwrite", "--steps", "1", *FAST], capsys)
    assert_user_error(code, err, mentions="the current folder")
    assert folder_listing(tmp_path) == listing and (checkpoint / "notes.txt").read_text() == "mine"


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["calibrate", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, mentions="not an SLA2 checkpoint")
