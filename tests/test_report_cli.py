"""`sla2 report`: hooks, the runner on real converted models, output files, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy
import pytest
import torch
from fixtures_hub import assert_user_error, run_cli
from safetensors.torch import save_file
from torch import nn

from sla2cli.embedded.config import MODEL_KWARGS
from sla2cli.integration.recipes import EMBEDDED_RECIPE, get_recipe
from sla2cli.module import SLA2Attention
from sla2cli.ops import k_selected
from sla2cli.ops.geometry import ROUNDING_NOTE, num_blocks
from sla2cli.report.capture import capture_metrics, dense_attention, find_sla2_layers, overridden_sparsity
from sla2cli.report.output import MIN_HALF_WIDTH
from sla2cli.report.summary import MetricAccumulator, rounded_levels, rounding_note
from sla2cli.sources.random_models import build_random_model, scaled_down_config

REQUIRED_COLUMNS = {
    "layer", "head", "sparsity", "k_sel", "captured_mass", "router_recall", "alpha_mean",
    "rel_l2_error", "cosine", "heuristic_rel_l2_error",
}
EMBEDDED_HEADS = MODEL_KWARGS["num_layers"] * MODEL_KWARGS["num_attention_heads"]
SMALL_CLIP = "2x32x32"  # latent frames x height x width: 2 * 16 * 16 = 512 tokens
SMALL_TOKENS = 512
EMBEDDED_BLOCK_K = get_recipe(EMBEDDED_RECIPE).block_k  # 16: the small clip has 32 key blocks
SMALL_KEY_BLOCKS = num_blocks(SMALL_TOKENS, EMBEDDED_BLOCK_K)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Error lines are judged whole; keep rich from wrapping them at 80 columns."""
    monkeypatch.setenv("COLUMNS", "400")


def _read_csv(path: Path, model_row: bool = True) -> list[dict[str, str]]:
    """The per-(layer, head) rows; the model row that ends the file (unless --no-model-quality) is checked
    and left out."""
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not model_row:
        assert all(row["layer"] != "model" for row in rows) and "output_rel_l2_error" not in rows[0]
        return rows
    assert rows[-1]["layer"] == "model" and rows[-1]["head"] == ""
    assert float(rows[-1]["output_rel_l2_error"]) > 0.0
    assert all(row["layer"] != "model" and row["output_rel_l2_error"] == "" for row in rows[:-1])
    return rows[:-1]


def _model_csv_row(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))[-1]


# --- hooks -------------------------------------------------------------------------------------------


class _TwoLayers(nn.Module):
    """Calls its SLA2 layers the way model processors do: through forward_bshd, which skips nn hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.first = SLA2Attention(2, 64, sparsity=0.5)
        self.second = SLA2Attention(2, 64, sparsity=0.5)
        with torch.no_grad():
            self.second.proj_q.add_(0.5 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))

    def forward(self, q, k, v):
        return self.second.forward_bshd(self.first.forward_bshd(q, k, v), k, v)


def _bshd(length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, 2, 64, generator=generator) for _ in range(3)]


def test_capture_sees_every_call_and_matches_brute_force():
    model = _TwoLayers()
    layers = find_sla2_layers(model)
    assert list(layers) == ["first", "second"]
    q, k, v = _bshd(300, seed=0)
    expected_output = model(q, k, v)
    accumulator = MetricAccumulator()
    with capture_metrics(layers, accumulator):
        output = model(q, k, v)
    torch.testing.assert_close(output, expected_output)  # the model's result is untouched
    assert "forward" not in vars(model.first)  # the hook is gone afterwards
    rows = accumulator.rows()
    assert [(row["layer"], row["head"]) for row in rows] == [("first", 0), ("first", 1), ("second", 0), ("second", 1)]

    # brute force for the first layer: full probabilities, the layer's own routing and output
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / 8.0, dim=-1)
    exact = probs @ vh
    routed = model.first.forward(*(x.transpose(1, 2) for x in (q, k, v))).double()
    from sla2cli.ops import route

    lut = route(*(x.transpose(1, 2) for x in (q, k)), sparsity=0.5).lut
    for head in range(2):
        masses = []
        for block, selected in enumerate(lut[0, head].tolist()):
            rows_of_block = probs[0, head, block * 128 : (block + 1) * 128]
            masses.append(sum(rows_of_block[:, j * 64 : (j + 1) * 64].sum(-1).mean().item() for j in selected))
        error = ((routed[0, head] - exact[0, head]).norm() / exact[0, head].norm()).item()
        assert rows[head]["captured_mass"] == pytest.approx(sum(masses) / len(masses), rel=1e-4)
        assert rows[head]["rel_l2_error"] == pytest.approx(error, rel=1e-4)


def test_capture_compares_the_lowbit_mode_on_the_layers_own_routing():
    from sla2cli.ops import route, sla2_reference
    from sla2cli.ops.quantization import sla2_lowbit_reference

    model = _TwoLayers()
    model.first.quant = "int8-fp8"  # the layer itself runs low-bit: its output is one side of the comparison
    layers = find_sla2_layers(model)
    q, k, v = _bshd(300, seed=3)
    expected_output = model(q, k, v)
    accumulator = MetricAccumulator()
    with capture_metrics(layers, accumulator, lowbit_quant="int8-fp8"):
        output = model(q, k, v)
    torch.testing.assert_close(output, expected_output)
    rows = accumulator.rows()

    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    routing = route(qh, kh, sparsity=0.5)
    alpha = model.first.predict_alpha(routing, 300).detach()
    lowbit = sla2_lowbit_reference(qh, kh, vh, routing.lut, mode="int8-fp8", alpha=alpha).double()
    exact = sla2_reference(qh, kh, vh, sparsity=0.5, alpha=alpha).double()
    for head in range(2):
        error = ((lowbit[0, head] - exact[0, head]).norm() / exact[0, head].norm()).item()
        assert rows[head]["lowbit_rel_l2_vs_sla2"] == pytest.approx(error, rel=1e-3)
    assert all(row["lowbit_rel_l2_vs_sla2"] > 0 for row in rows[2:])  # the unquantised layer too


def test_dense_override_and_sparsity_override_restore_the_layers():
    model = _TwoLayers()
    layers = find_sla2_layers(model)
    q, k, v = _bshd(256, seed=2)
    with dense_attention(layers):
        dense = model.first.forward_bshd(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(dense, reference.transpose(1, 2))
    with overridden_sparsity(layers, 0.9):
        assert {layer.sparsity for layer in layers.values()} == {0.9}
    assert {layer.sparsity for layer in layers.values()} == {0.5}
    assert "forward" not in vars(model.first)


# --- the command on the embedded model ---------------------------------------------------------------


def test_report_writes_csv_json_and_heatmap(embedded_model, tmp_path, capsys):
    out_csv, out_json, out_png = tmp_path / "r.csv", tmp_path / "r.json", tmp_path / "h.png"
    code, stdout, err = run_cli(
        ["report", "--resolution", SMALL_CLIP, "--timesteps", "0.9,0.1", "--csv", str(out_csv),
         "--json", str(out_json), "--heatmap", str(out_png), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "blocks.0.attn1" in stdout
    rows = _read_csv(out_csv)
    assert REQUIRED_COLUMNS <= set(rows[0])
    assert len(rows) == EMBEDDED_HEADS
    assert {(row["layer"], row["head"]) for row in rows} == {
        (str(layer), str(head))
        for layer in range(MODEL_KWARGS["num_layers"]) for head in range(MODEL_KWARGS["num_attention_heads"])
    }
    k_sel = k_selected(SMALL_KEY_BLOCKS, 0.97)
    for row in rows:
        assert int(row["k_sel"]) == k_sel
        assert int(row["samples"]) == 2  # one clip at two timesteps
        assert 0.0 < float(row["captured_mass"]) <= 1.0 + 1e-6
        assert float(row["captured_mass_min"]) <= float(row["captured_mass"]) + 1e-6
        assert 0.0 <= float(row["router_recall"]) <= 1.0
        assert float(row["alpha_min"]) <= float(row["alpha_mean"]) <= float(row["alpha_max"])
        assert float(row["rel_l2_error"]) > 0.0 and -1.0 <= float(row["cosine"]) <= 1.0
    document = json.loads(out_json.read_text())
    assert len(document["rows"]) == EMBEDDED_HEADS
    assert len(document["layers"]) == MODEL_KWARGS["num_layers"]
    assert document["settings"]["timesteps"] == [0.9, 0.1]
    assert document["model"]["heads"] == EMBEDDED_HEADS
    assert math.isclose(
        document["model"]["rel_l2_error"], sum(float(row["rel_l2_error"]) for row in rows) / len(rows), rel_tol=1e-6
    )
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary files left
    # --quant defaults to auto, which is int8 (emulated) on a CPU
    assert document["settings"]["quant"] == "auto" and document["settings"]["quant_compared"] == "int8"
    assert all(0.0 < float(row["lowbit_rel_l2_vs_sla2"]) < 1.0 for row in rows)
    assert "lowbit_rel_l2_vs_sla2" in document["model"] and "lowbit_rel_l2_vs_sla2" in document["layers"][0]
    quality = document["model_quality"]
    assert set(quality) == {"output_rel_l2_error", "val_loss", "dense_val_loss", "val_loss_ratio"}
    assert quality["val_loss_ratio"] == pytest.approx(quality["val_loss"] / quality["dense_val_loss"])
    model_row = _model_csv_row(out_csv)
    assert float(model_row["val_loss"]) == pytest.approx(quality["val_loss"])
    assert float(model_row["rel_l2_error"]) == pytest.approx(document["model"]["rel_l2_error"])
    assert "model output vs dense attention" in " ".join(stdout.split())


def test_model_quality_matches_the_unconverted_model(embedded_model):
    """The model-level figures against the model as it was before conversion, computed here directly."""
    from sla2cli.embedded.loading import load_embedded_model
    from sla2cli.embedded.train import validation_loss
    from sla2cli.report.inputs import embedded_samples, family_inputs, forward_inputs
    from sla2cli.report.loading import load_report_target
    from sla2cli.report.runner import ReportSettings, run_report

    cpu = torch.device("cpu")
    target = load_report_target(None, sparsity=None, device=cpu, dtype=torch.float32)
    settings = ReportSettings(timesteps=(0.9, 0.1), resolution=SMALL_CLIP, clips=2, quant="none")
    quality = run_report(target, settings, device=cpu, dtype=torch.float32).quality
    original = load_embedded_model()
    adapter = family_inputs(target.main, target.recipe)
    samples = embedded_samples(adapter, (2, 32, 32), 2)
    errors = []
    with torch.no_grad():
        for item in forward_inputs(adapter, samples, (0.9, 0.1), seed=0, device=cpu, dtype=torch.float32):
            sla2 = target.main(**item.kwargs, return_dict=False)[0]
            dense = original(**item.kwargs, return_dict=False)[0]
            errors.append(((sla2 - dense).norm() / dense.norm()).item())
    assert quality["output_rel_l2_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    clean = torch.cat([sample.latents for sample in samples])
    text = torch.cat([sample.text for sample in samples])
    assert quality["dense_val_loss"] == pytest.approx(validation_loss(original, clean, text, False), rel=1e-4)
    assert quality["val_loss"] == pytest.approx(validation_loss(target.main, clean, text, False), rel=1e-5)
    assert quality["val_loss"] > quality["dense_val_loss"]  # 97% at 512 tokens keeps one key block of 32


def test_alias_and_sparsity_override(embedded_model, tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    code, stdout, err = run_cli(
        ["sparsity-report", "--sparsity", "0.5", "--resolution", SMALL_CLIP, "--timesteps", "0.5",
         "--csv", str(out_csv), "--quant", "none", "--no-model-quality", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "model output" not in stdout
    rows = _read_csv(out_csv, model_row=False)
    assert "lowbit_rel_l2_vs_sla2" not in rows[0]
    assert {int(row["k_sel"]) for row in rows} == {k_selected(SMALL_KEY_BLOCKS, 0.5)}
    assert all(float(row["sparsity"]) == pytest.approx(0.5) for row in rows)
    assert all(float(row["effective_sparsity"]) == float(row["requested_sparsity"]) == 0.5 for row in rows)
    assert "note:" not in stdout  # 0.5 of 32 key blocks is exactly 16: nothing was rounded


def test_rounded_sparsity_is_shown_and_said_once(embedded_model, tmp_path, capsys, monkeypatch):
    """At 512 tokens (32 key blocks) 0.9 keeps 3: the effective sparsity is 0.906, not 0.9."""
    monkeypatch.setenv("COLUMNS", "80")
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    code, stdout, err = run_cli(
        ["report", "--sparsity", "0.9", "--resolution", SMALL_CLIP, "--timesteps", "0.5", "--quant", "none",
         "--csv", str(out_csv), "--json", str(out_json), "--quiet"],
        capsys,
    )
    assert code == 0, err
    kept = k_selected(SMALL_KEY_BLOCKS, 0.9)
    effective = 1 - kept / SMALL_KEY_BLOCKS
    for row in _read_csv(out_csv):
        assert float(row["requested_sparsity"]) == pytest.approx(0.9)
        assert float(row["effective_sparsity"]) == pytest.approx(effective)
        assert (int(row["k_sel"]), int(row["key_blocks"])) == (kept, SMALL_KEY_BLOCKS)
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {ROUNDING_NOTE}: 0.9 keeps {kept} of {SMALL_KEY_BLOCKS} key blocks (effective_sparsity {effective:.3f})"
    ]
    assert json.loads(out_json.read_text())["notes"] == [notes[0].removeprefix("note: ")]
    model_line = next(line for line in stdout.splitlines() if line.startswith("│ model"))
    assert f"{effective:.3f}" in model_line  # the table's sparsity column is the effective one

    monkeypatch.setenv("COLUMNS", "200")  # wide: the requested value and k_sel stand beside it
    code, stdout, err = run_cli(
        ["report", "--sparsity", "0.9", "--resolution", SMALL_CLIP, "--timesteps", "0.5", "--quant", "none",
         "--quiet"],
        capsys,
    )
    header = next(line for line in stdout.splitlines() if line.startswith("┃ layer"))
    assert "requested" in header and "k_sel" in header


def test_rounding_note_lists_each_rounded_level_once():
    rows = [
        {"requested_sparsity": 0.97, "key_blocks": 128, "k_sel": 3},
        {"requested_sparsity": 0.97, "key_blocks": 128, "k_sel": 3},
        {"requested_sparsity": 0.5, "key_blocks": 128, "k_sel": 64},
        {"requested_sparsity": 0.9, "key_blocks": 16, "k_sel": 1},
    ]
    assert rounded_levels(rows) == [(128, 0.97), (16, 0.9)]
    assert rounding_note(rows).endswith(
        "0.97 keeps 3 of 128 key blocks (effective_sparsity 0.977), 0.9 keeps 1 of 16 key blocks "
        "(effective_sparsity 0.938)"
    )
    assert rounding_note(rows[2:3]) is None


def test_inputs_file_is_used(embedded_model, tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    channels, text_dim = MODEL_KWARGS["in_channels"], MODEL_KWARGS["text_dim"]
    inputs = tmp_path / "inputs.safetensors"
    save_file(
        {"latents": torch.randn(2, channels, 2, 32, 32, generator=generator),
         "encoder_hidden_states": torch.randn(2, 8, text_dim, generator=generator)},
        str(inputs),
    )
    out_json = tmp_path / "r.json"
    code, _, err = run_cli(
        ["report", "--inputs", str(inputs), "--timesteps", "0.5", "--json", str(out_json), "--quiet"],
        capsys,
    )
    assert code == 0, err
    document = json.loads(out_json.read_text())
    assert document["settings"]["samples"] == ["input 0", "input 1"]
    assert {row["samples"] for row in document["rows"]} == {2}


def test_video_shows_dense_beside_sla2(embedded_model, tmp_path, capsys):
    from PIL import Image

    gif = tmp_path / "v.gif"
    code, stdout, err = run_cli(
        ["report", "--resolution", SMALL_CLIP, "--timesteps", "0.5", "--video", str(gif), "--video-steps", "2",
         "--quiet"],
        capsys,
    )
    assert code == 0, err
    with Image.open(gif) as image:
        assert image.format == "GIF"
        assert image.n_frames == 2  # one per latent frame
        assert image.width >= 2 * MIN_HALF_WIDTH  # two clips side by side, enlarged so their labels fit
        first = torch.from_numpy(numpy.array(image.convert("L"))).float()
    half = image.width // 2
    strip = first[: _label_strip_height(first)]
    assert strip.shape[0] >= 8
    for part in (strip[:, : half - 2], strip[:, half + 2 :]):  # dark text above each half
        assert part.min() < 100 and part.max() > 200


def _label_strip_height(frame: torch.Tensor) -> int:
    """Rows above the clips: text leaves a row mostly white, the first row of the clips does not."""
    mostly_white = (frame > 250).float().mean(dim=1) > 0.6
    return int(torch.nonzero(~mostly_white)[0].item())


def test_each_half_of_the_video_is_labelled():
    from PIL import Image

    from sla2cli.report.output import labelled_side_by_side

    black = Image.new("RGB", (MIN_HALF_WIDTH, 40), "black")
    names = ("dense attention", "SLA2, sparsity 0.97")
    frame = numpy.asarray(labelled_side_by_side(black, black, names).convert("L"))
    swapped = numpy.asarray(labelled_side_by_side(black, black, names[::-1]).convert("L"))
    width = MIN_HALF_WIDTH
    strip_height = frame.shape[0] - 40
    left, right = frame[:strip_height, :width], frame[:strip_height, -width:]
    assert left.min() < 100 and right.min() < 100  # text on a white strip above each half
    assert not numpy.array_equal(left, right)  # two different labels
    assert numpy.array_equal(left, swapped[:strip_height, -width:])  # the label follows its half
    assert (frame[strip_height:, :width] == 0).all()  # the clip itself is untouched


def test_video_label_names_the_sparsity_the_samples_ran_at(embedded_model):
    from sla2cli.report.loading import load_report_target
    from sla2cli.report.runner import ReportSettings
    from sla2cli.report.sampling import sla2_label

    target = load_report_target(None, sparsity=None, device=torch.device("cpu"), dtype=torch.float32)
    assert sla2_label(target, ReportSettings()) == f"SLA2, sparsity {target.recipe.sparsity:g}"
    assert sla2_label(target, ReportSettings(sparsity=0.9)) == "SLA2, sparsity 0.9"


# --- converted Hub-family checkpoints (random weights, local folders) ---------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Checkpoints of scaled-down random Wan and CogVideoX models, converted by `sla2 convert`."""
    from sla2cli.cli import main

    root = tmp_path_factory.mktemp("converted")
    checkpoints = {}
    for recipe in ("wan2.1-t2v-1.3b", "cogvideox-5b", "wan2.2-t2v-a14b"):
        base = root / f"{recipe}-base"
        for seed, component in enumerate(get_recipe(recipe).components):
            model = build_random_model(recipe, full_size=False, seed=seed)
            model.save_pretrained(base / component, safe_serialization=True)
        out = root / f"{recipe}-sla2"
        try:
            main(["convert", str(base), "--out", str(out), "--recipe", recipe])
        except SystemExit as done:
            assert done.code in (0, None)
        checkpoints[recipe] = out
    return checkpoints


@pytest.mark.parametrize(
    "recipe, components", [("wan2.1-t2v-1.3b", 1), ("cogvideox-5b", 1), ("wan2.2-t2v-a14b", 2)]
)
def test_checkpoint_with_random_inputs_warns(converted, recipe, components, tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    code, stdout, err = run_cli(
        ["report", str(converted[recipe]), "--resolution", "5x128x128", "--timesteps", "0.5",
         "--csv", str(out_csv), "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "random inputs understate" in " ".join(stdout.split())
    assert "validation loss" not in stdout  # the embedded model's own figure only
    assert "val_loss" not in _model_csv_row(out_csv)
    rows = _read_csv(out_csv)
    config = scaled_down_config(recipe)
    assert len(rows) == components * config["num_layers"] * config["num_attention_heads"]
    assert len({row["component"] for row in rows}) == components
    assert all(0.0 < float(row["captured_mass"]) <= 1.0 + 1e-6 for row in rows)


def test_video_needs_viewable_latents(converted, tmp_path, capsys):
    code, _, err = run_cli(
        ["report", str(converted["wan2.1-t2v-1.3b"]), "--video", str(tmp_path / "v.gif")], capsys
    )
    assert_user_error(code, err, mentions="--video")


# --- bad input ---------------------------------------------------------------------------------------


def test_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    code, _, err = run_cli(["report", str(folder)], capsys)
    assert_user_error(code, err, mentions="not an SLA2 checkpoint")


@pytest.mark.parametrize("timesteps", ["0.9,,0.1", "fast", "0.5,1.5", "-0.1"])
def test_malformed_timesteps(timesteps, capsys):
    code, _, err = run_cli(["report", "--timesteps", timesteps], capsys)
    assert_user_error(code, err, mentions="--timesteps")


@pytest.mark.parametrize(
    "tensors, mentions",
    [
        ({"latents": torch.randn(1, 3, 2, 32, 32), "encoder_hidden_states": torch.randn(1, 8, 32)}, "channels"),
        ({"latents": torch.randn(1, 4, 2, 31, 32), "encoder_hidden_states": torch.randn(1, 8, 32)}, "patch"),
        ({"latents": torch.randn(1, 4, 2, 32, 32), "encoder_hidden_states": torch.randn(1, 8, 7)}, "width"),
        ({"latents": torch.randn(4, 2, 32, 32), "encoder_hidden_states": torch.randn(1, 8, 32)}, "rank 5"),
        ({"latents": torch.randn(2, 4, 2, 32, 32), "encoder_hidden_states": torch.randn(1, 8, 32)}, "clips"),
        ({"latents": torch.randn(1, 4, 2, 32, 32)}, "missing"),
    ],
)
def test_inputs_file_with_wrong_shapes(embedded_model, tmp_path, capsys, tensors, mentions):
    inputs = tmp_path / "bad.safetensors"
    save_file(tensors, str(inputs))
    code, _, err = run_cli(["report", "--inputs", str(inputs), "--quiet"], capsys)
    assert_user_error(code, err, mentions=mentions)


def test_inputs_file_that_is_not_safetensors(embedded_model, tmp_path, capsys):
    inputs = tmp_path / "bad.safetensors"
    inputs.write_bytes(b"not a safetensors file")
    code, _, err = run_cli(["report", "--inputs", str(inputs), "--quiet"], capsys)
    assert_user_error(code, err, mentions="safetensors")


@pytest.mark.parametrize(
    "args, mentions",
    [
        (["--csv", "report.txt"], "--csv"),
        (["--resolution", "64x64"], "--resolution"),
        (["--sparsity", "1.2"], "--sparsity"),
        (["--clips", "0"], "--clips"),
        (["--quant", "int4"], "--quant must be one of none, int8, int8-fp8, auto"),
    ],
)
def test_bad_options(embedded_model, args, mentions, capsys):
    code, _, err = run_cli(["report", *args, "--quiet"], capsys)
    assert_user_error(code, err, mentions=mentions)
