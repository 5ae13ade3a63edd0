"""`sla2 calibrate`: capture, per-layer training, the written checkpoint, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures_hub import assert_user_error, folder_listing, run_cli
from safetensors.torch import load_file

from sla2cli import api
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import get_recipe
from sla2cli.report.inputs import embedded_samples, family_inputs, forward_inputs
from sla2cli.report.loading import load_report_target
from sla2cli.training.calibration import (
    ALPHA_ONLY,
    ROUTER_AND_ALPHA,
    UNCHANGED,
    CalibrationSettings,
    calibrate_layers,
    collect_calls,
    mean_hard_error,
)

SMALL_CLIP = "2x32x32"  # latent frames x height x width: 512 tokens, 4 query blocks, 8 key blocks
SMALL_GRID = (2, 32, 32)
FAST = ["--resolution", SMALL_CLIP, "--timesteps", "0.9,0.1", "--router-steps", "20", "--alpha-steps", "30", "--quiet"]
ATTENTION_FILE = "sla2_attention.safetensors"
ROUTER_KEYS = (".proj_q", ".proj_k")


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
    out = layer(call.q, call.k, call.v)
    per_head = [((out[0, h] - dense[0, h]).norm() / dense[0, h].norm()).item() for h in range(4)]
    assert mean_hard_error(layer, [call]) == pytest.approx(sum(per_head) / 4, rel=1e-5)
    assert min(per_head) > 0.01  # 97% sparsity at 512 tokens keeps one key block of eight: far from dense


def _settings(**overrides) -> CalibrationSettings:
    return CalibrationSettings.from_recipe(get_recipe("embedded"), router_steps=40, alpha_steps=60, **overrides)


def test_calibration_lowers_the_error_keeps_the_best_candidate_and_touches_only_sla2_parameters(checkpoint):
    target, layers, calls = _small_calls(checkpoint)
    base_before = {name: p.clone() for name, p in target.main.named_parameters() if ".sla2." not in name}
    sla2_before = {name: {k: v.clone() for k, v in layer.state_dict().items()} for name, layer in layers.items()}
    layers[next(iter(layers))].requires_grad_(False)
    flags = {name: layer.proj_q.requires_grad for name, layer in layers.items()}  # restored as they were
    results = calibrate_layers(layers, calls, _settings())
    assert [result.name for result in results] == list(layers)
    assert sum(result.rel_l2_final for result in results) < sum(result.rel_l2_before for result in results)
    for result in results:
        assert result.trained
        layer, before = layers[result.name], sla2_before[result.name]
        candidates = {ALPHA_ONLY: result.rel_l2_alpha_only, ROUTER_AND_ALPHA: result.rel_l2_router,
                      UNCHANGED: result.rel_l2_before}
        assert result.choice == min(candidates, key=candidates.get)  # a tie keeps the trained parameters
        assert mean_hard_error(layer, calls[result.name]) == pytest.approx(result.rel_l2_final, rel=1e-5)
        state = layer.state_dict()
        router_moved = any(not torch.equal(state[key], before[key]) for key in ("proj_q", "proj_k"))
        alpha_moved = any(not torch.equal(state[key], before[key]) for key in state if key.startswith("alpha_"))
        assert router_moved == (result.choice == ROUTER_AND_ALPHA)
        assert alpha_moved == result.kept
        assert all(p.requires_grad == flags[result.name] and p.grad is None for p in layer.parameters())
    for name, p in target.main.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name


def test_alpha_only_keeps_the_router(checkpoint):
    _, layers, calls = _small_calls(checkpoint)
    routers = {name: (layer.proj_q.clone(), layer.proj_k.clone()) for name, layer in layers.items()}
    results = calibrate_layers(layers, calls, _settings(train_router=False))
    assert all(result.choice in (ALPHA_ONLY, UNCHANGED) for result in results)
    assert any(result.choice == ALPHA_ONLY for result in results)
    assert all(math.isnan(result.rel_l2_router) and math.isnan(result.mass_before) for result in results)
    for name, layer in layers.items():
        assert torch.equal(layer.proj_q, routers[name][0]) and torch.equal(layer.proj_k, routers[name][1])


def test_recipe_defaults_and_overrides():
    defaults = get_recipe("embedded").calibration
    settings = CalibrationSettings.from_recipe(get_recipe("embedded"), alpha_steps=7, tau=None)
    assert settings.alpha_steps == 7 and settings.tau == defaults.tau
    assert settings.router_steps == defaults.router_steps
    assert settings.steps_per_layer() == defaults.router_steps + 2 * 7
    assert CalibrationSettings.from_recipe(get_recipe("embedded"), train_router=False).steps_per_layer() == (
        defaults.alpha_steps
    )


def test_cli_writes_a_loadable_calibrated_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "calibrated"
    code, stdout, err = run_cli(["calibrate", str(checkpoint), "--out", str(out), *FAST], capsys)
    assert code == 0, err
    assert "rel L2" in stdout and "blocks.0.attn1" in stdout and "blocks.3.attn1" in stdout
    before, after = load_file(str(checkpoint / ATTENTION_FILE)), load_file(str(out / ATTENTION_FILE))
    assert before.keys() == after.keys()
    changed_layers = {key.rsplit(".", 1)[0] for key in before if not torch.equal(before[key], after[key])}
    config = json.loads((out / "sla2_config.json").read_text(encoding="utf-8"))
    assert config["base_weights"] == "referenced"
    figures = config["measurements"]
    assert figures["calibration_router_steps"] == 20 and figures["calibration_alpha_steps"] == 30
    assert figures["calibration_rel_l2_after"] < figures["calibration_rel_l2_before"]
    assert figures["calibration_captured_mass_before"] > 0
    assert len(changed_layers) == figures["calibration_layers_kept"] >= 1
    changed_keys = [key for key in before if key.rsplit(".", 1)[0] in changed_layers]
    assert all(key.endswith(ROUTER_KEYS) or ".alpha_" in key for key in changed_keys)
    router_changed = {key.rsplit(".", 1)[0] for key in before if key.endswith(ROUTER_KEYS)
                      and not torch.equal(before[key], after[key])}
    assert len(router_changed) == figures["calibration_layers_with_trained_router"]
    model = api.load(out)
    loaded = {name: layer.alpha_bias for name, layer in sla2_layers(model).items()}
    key = next(k for k in after if k.endswith("alpha_bias") and k.rsplit(".", 1)[0] in changed_layers)
    assert any(torch.equal(after[key], bias) for bias in loaded.values())


def test_cli_no_router_fits_alpha_only(checkpoint, tmp_path, capsys):
    out = tmp_path / "alpha-only"
    code, stdout, err = run_cli(["calibrate", str(checkpoint), "--out", str(out), "--no-router", *FAST], capsys)
    assert code == 0, err
    assert "router kept" in " ".join(stdout.split())
    before, after = load_file(str(checkpoint / ATTENTION_FILE)), load_file(str(out / ATTENTION_FILE))
    assert all(torch.equal(before[key], after[key]) for key in before if key.endswith(ROUTER_KEYS))
    assert any(not torch.equal(before[key], after[key]) for key in before if ".alpha_" in key)
    figures = json.loads((out / "sla2_config.json").read_text(encoding="utf-8"))["measurements"]
    assert figures["calibration_router_steps"] == 0 and figures["calibration_layers_with_trained_router"] == 0


def test_cli_overwrites_in_place_only_when_asked(checkpoint, capsys):
    original = load_file(str(checkpoint / ATTENTION_FILE))
    code, _, err = run_cli(["calibrate", str(checkpoint), "--overwrite", *FAST], capsys)
    assert code == 0, err
    updated = load_file(str(checkpoint / ATTENTION_FILE))
    assert any(not torch.equal(original[key], updated[key]) for key in original)
    config = json.loads((checkpoint / "sla2_config.json").read_text(encoding="utf-8"))
    assert "calibration_layers_kept" in config["measurements"]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--router-steps", "-1"], "--router-steps"),
        (["--alpha-steps", "-1"], "--alpha-steps"),
        (["--alpha-steps", "0", "--no-router"], "nothing to train"),
        (["--timesteps", "0.9,abc"], "--timesteps"),
        (["--timesteps", "1.5"], "--timesteps"),
        (["--router-lr", "0"], "--router-lr"),
        (["--alpha-lr", "nan"], "--alpha-lr"),
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
    code, _, err = run_cli(["calibrate", str(checkpoint), "--alpha-steps", "1"], capsys)
    assert_user_error(code, err, mentions="--out")
    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, err = run_cli(["calibrate", str(checkpoint), "--out", str(existing), "--alpha-steps", "1"], capsys)
    assert_user_error(code, err, mentions="--overwrite")
    assert folder_listing(checkpoint) == listing and not any(existing.iterdir())


def test_overwrite_in_place_keeps_a_users_file(checkpoint, tmp_path, monkeypatch, capsys):
    (checkpoint / "notes.txt").write_text("mine")
    listing = folder_listing(tmp_path)
    code, _, err = run_cli(["calibrate", str(checkpoint), "--overwrite", *FAST], capsys)
    assert_user_error(code, err, mentions=r"notes\.txt, which sla2 did not write")
    monkeypatch.chdir(checkpoint)
    code, _, err = run_cli(["calibrate", ".", "--overwrite", *FAST], capsys)
    assert_user_error(code, err, mentions="the current folder")
    assert folder_listing(tmp_path) == listing and (checkpoint / "notes.txt").read_text() == "mine"


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["calibrate", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, mentions="not an SLA2 checkpoint")


def test_embedded_model_calibrates_on_its_own_clips_not_the_validation_clips(checkpoint):
    from sla2cli.report.runner import ReportSettings, clean_samples

    target = load_report_target(str(checkpoint), sparsity=None, device=torch.device("cpu"), dtype=torch.float32)
    adapter = family_inputs(target.main, target.recipe)
    settings = ReportSettings(resolution=SMALL_CLIP, clips=2)
    calibration, _ = clean_samples(target, adapter, settings, calibration=True)
    validation, _ = clean_samples(target, adapter, settings)
    assert [sample.label for sample in calibration] == ["calibration clip 0", "calibration clip 1"]
    for fitted in calibration:
        assert all(not torch.equal(fitted.latents, measured.latents) for measured in validation)
    assert get_recipe("embedded").calibration.clips >= 1
