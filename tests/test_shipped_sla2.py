"""The shipped SLA2 weights of the embedded model: the format, `sla2 convert` with and without them, and the
report's comparison with the shipped dense model and the untrained conversion."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_hub import assert_user_error, run_cli
from rich.console import Console

import sla2cli
from sla2cli.embedded.config import ASSETS_DIR
from sla2cli.embedded.loading import embedded_example_inputs, load_embedded_model
from sla2cli.embedded.shipped_sla2 import (
    SHIPPED_FILENAMES,
    SHIPPED_RECORD_FILENAME,
    SHIPPED_WEIGHTS_FILENAME,
    add_shipped_measurements,
    load_shipped_sla2,
    shipped_sla2_record,
    write_shipped_sla2,
)
from sla2cli.embedded.train import validation_loss
from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_layers
from sla2cli.report.inputs import embedded_samples, family_inputs
from sla2cli.report.loading import load_report_target
from sla2cli.report.output import render_quality
from sla2cli.report.runner import ReportSettings, run_report

MEASUREMENTS = {"shipped_val_loss": 0.0812, "finetune_steps": 7}
SMALL_CLIP = "2x32x32"  # 512 tokens: 8 key blocks, so 0.97 keeps one
MAX_RETURNED_FILE_BYTES = 16 * 2**20  # what comes back from a GPU run


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


def _trained_model() -> torch.nn.Module:
    """The embedded model converted at 0.97 with SLA2 parameters and base weights moved off their starting
    values, as calibration and fine-tuning would leave them."""
    model = load_embedded_model()
    sla2cli.convert(model, sparsity=0.97)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in sla2_layers(model).values():
            layer.proj_q.add_(0.05 * torch.randn(layer.proj_q.shape, generator=generator))
            layer.alpha_bias.copy_(torch.randn(layer.alpha_bias.shape, generator=generator))
        weight = model.blocks[0].ffn.net[0].proj.weight
        weight.add_(0.01 * torch.randn(weight.shape, generator=generator))
    return model


@pytest.fixture()
def shipped(embedded_model, tmp_path, monkeypatch) -> torch.nn.Module:
    """A fake shipped asset (the real format, made here) installed as the package's; returns the model it
    was written from (float32, not rounded)."""
    model = _trained_model()
    folder = tmp_path / "assets"
    write_shipped_sla2(model, folder, MEASUREMENTS)
    monkeypatch.setattr("sla2cli.embedded.shipped_sla2.ASSETS_DIR", folder)
    return model


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**embedded_example_inputs(frames=2, height=32, width=32), return_dict=False)[0]


def test_shipped_form_rounds_base_weights_and_keeps_sla2_parameters(shipped):
    loaded = load_shipped_sla2()
    for original, restored in zip(sla2_layers(shipped).values(), sla2_layers(loaded).values(), strict=True):
        for key, value in original.state_dict().items():
            assert torch.equal(value, restored.state_dict()[key]), key
    trained = shipped.blocks[0].ffn.net[0].proj.weight
    restored = loaded.blocks[0].ffn.net[0].proj.weight
    assert restored.dtype == torch.float32
    assert torch.equal(restored, trained.to(torch.bfloat16).float())
    assert not torch.equal(restored, trained)  # rounded: what users load, and what the suite evaluates
    norm = next(name for name in dict(shipped.named_parameters()) if "scale_shift_table" in name)
    assert torch.equal(dict(loaded.named_parameters())[norm], dict(shipped.named_parameters())[norm])  # kept fp32
    assert sla2_layers(loaded)["blocks.0.attn1"].sparsity == 0.97
    assert torch.allclose(_forward(loaded), _forward(shipped), atol=0.05)


def test_record_is_written_last_and_measurements_are_added(shipped, tmp_path):
    folder = tmp_path / "assets"
    record = add_shipped_measurements(folder, {"dense_reference_val_loss": 0.0799})
    assert record["measurements"] == {**MEASUREMENTS, "dense_reference_val_loss": 0.0799}
    assert shipped_sla2_record(folder) == record
    (folder / SHIPPED_WEIGHTS_FILENAME).unlink()
    assert shipped_sla2_record(folder) is None  # a partial asset is no asset: convert falls back


def test_convert_without_model_writes_the_shipped_model(shipped, tmp_path, capsys):
    out = tmp_path / "embedded-sla2"
    code, stdout, err = run_cli(["convert", "--out", str(out)], capsys)
    assert code == 0, err
    assert "shipped SLA2" in stdout
    config = json.loads((out / "sla2_config.json").read_text())
    assert config["base_weights"] == "included" and config["base_model"]["source"] == "embedded"
    assert config["sparsity"] == 0.97
    assert config["measurements"] == MEASUREMENTS
    assert torch.equal(_forward(sla2cli.load(out)), _forward(load_shipped_sla2()))
    assert "| steps | 7 |" in (out / "README.md").read_text()


def test_untrained_flag_and_other_sparsities_give_the_untrained_conversion(shipped, tmp_path, capsys):
    untrained = load_embedded_model()
    sla2cli.convert(untrained, sparsity=0.97)
    out = tmp_path / "untrained"
    code, stdout, err = run_cli(["convert", "--untrained", "--out", str(out)], capsys)
    assert code == 0, err
    assert "untrained conversion" in stdout
    assert json.loads((out / "sla2_config.json").read_text())["base_weights"] == "referenced"
    assert torch.equal(_forward(sla2cli.load(out)), _forward(untrained))

    other = tmp_path / "at-0.9"
    code, stdout, err = run_cli(["convert", "--sparsity", "0.9", "--out", str(other)], capsys)
    assert code == 0, err
    assert "the shipped SLA2 weights are calibrated and fine-tuned at sparsity 0.97" in " ".join(stdout.split())
    config = json.loads((other / "sla2_config.json").read_text())
    assert config["base_weights"] == "referenced" and config["sparsity"] == 0.9


def test_without_shipped_assets_convert_is_the_untrained_conversion(embedded_model, tmp_path, capsys):
    out = tmp_path / "embedded-sla2"
    code, stdout, err = run_cli(["convert", "--out", str(out)], capsys)
    assert code == 0, err
    assert "untrained conversion" in stdout
    assert json.loads((out / "sla2_config.json").read_text())["base_weights"] == "referenced"
    with pytest.raises(UserError, match="no shipped SLA2 weights"):
        load_shipped_sla2()


def test_bad_input(shipped, tmp_path, capsys):
    code, _, err = run_cli(["convert", str(tmp_path), "--untrained", "--out", str(tmp_path / "o")], capsys)
    assert_user_error(code, err, mentions="--untrained is for the embedded model")
    record = tmp_path / "assets" / SHIPPED_RECORD_FILENAME
    record.write_text(json.dumps({"format": "something else"}))
    code, _, err = run_cli(["convert", "--out", str(tmp_path / "p")], capsys)
    assert_user_error(code, err, mentions="not a shipped SLA2 record; reinstall sla2")
    assert not (tmp_path / "p").exists()


def test_report_sets_a_model_with_own_weights_beside_shipped_dense_and_untrained(shipped, tmp_path, capsys):
    out = tmp_path / "embedded-sla2"
    assert run_cli(["convert", "--out", str(out)], capsys)[0] == 0
    cpu = torch.device("cpu")
    target = load_report_target(str(out), sparsity=None, device=cpu, dtype=torch.float32)
    settings = ReportSettings(timesteps=(0.9,), resolution=SMALL_CLIP, clips=1, quant="none")
    quality = run_report(target, settings, device=cpu, dtype=torch.float32).quality

    samples = embedded_samples(family_inputs(target.main, target.recipe), (2, 32, 32), 1)
    clean, text = samples[0].latents, samples[0].text
    dense = load_embedded_model()
    untrained = sla2cli.convert(load_embedded_model(), sparsity=0.97)
    assert quality["shipped_dense_val_loss"] == pytest.approx(validation_loss(dense, clean, text, False), rel=1e-5)
    assert quality["untrained_val_loss"] == pytest.approx(validation_loss(untrained, clean, text, False), rel=1e-5)
    assert quality["val_loss"] == pytest.approx(validation_loss(load_shipped_sla2(), clean, text, False), rel=1e-5)
    ratio = quality["val_loss"] / quality["shipped_dense_val_loss"]
    assert quality["val_loss_vs_shipped_dense"] == pytest.approx(ratio)
    assert quality["dense_val_loss"] != pytest.approx(quality["shipped_dense_val_loss"])  # its own weights, dense

    render_quality(Console(width=200), quality)
    shown = " ".join(capsys.readouterr().out.split())
    assert "dense: the shipped embedded model, full attention" in shown
    assert "SLA2, untrained conversion of it (same sparsity)" in shown
    assert f"{quality['val_loss']:.4f}" in shown


@pytest.mark.skipif(shipped_sla2_record(ASSETS_DIR) is None, reason="the shipped SLA2 weights are not built yet")
def test_real_shipped_assets_fit_the_model_and_say_how_they_were_made():
    record = shipped_sla2_record(ASSETS_DIR)
    assert record["sparsity"] == 0.97
    for key in ("shipped_val_loss", "dense_reference_val_loss", "untrained_conversion_val_loss", "finetune_steps"):
        assert key in record["measurements"], key
    assert all((ASSETS_DIR / name).stat().st_size < MAX_RETURNED_FILE_BYTES for name in SHIPPED_FILENAMES)
    model = load_shipped_sla2(assets_dir=ASSETS_DIR)
    assert torch.isfinite(_forward(model)).all()
