"""`sla2 convert` and `sla2cli.convert`: what gets converted, exactness at sparsity 0, and bad input."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from fixtures_hub import assert_user_error, folder_listing, run_cli, scaled_down_components, small_inputs
from safetensors.torch import load_file, save_file

import sla2cli
from sla2cli.embedded.config import ASSETS_DIR, CONFIG_FILENAME, WEIGHTS_FILENAME
from sla2cli.errors import UserError
from sla2cli.integration.conversion import (
    attention_layers,
    conversion_info,
    convert_component,
    sla2_layers,
    sla2_processors,
)
from sla2cli.integration.processors import CogVideoXSLA2Processor, WanSLA2Processor
from sla2cli.integration.recipes import all_recipes
from sla2cli.ops import k_selected, num_blocks
from sla2cli.sources.base import BaseModelRef
from sla2cli.sources.random_models import build_random_model, example_inputs

WAN = all_recipes()["wan2.1-t2v-1.3b"]
EMBEDDED_SHIPPED = (ASSETS_DIR / CONFIG_FILENAME).is_file() and (ASSETS_DIR / WEIGHTS_FILENAME).is_file()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Error lines are judged whole; keep rich from wrapping them at 80 columns."""
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture()
def wan_folder(tmp_path) -> Path:
    """A diffusers pipeline folder with a scaled-down, random-weight Wan transformer."""
    folder = tmp_path / "wan-small"
    build_random_model(WAN.name, full_size=False).save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.skipif(not EMBEDDED_SHIPPED, reason="the embedded model's trained weights are not built yet")
def test_convert_without_arguments_converts_the_embedded_model(tmp_path, monkeypatch, capsys):
    from sla2cli.embedded.loading import embedded_example_inputs, load_embedded_model

    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["convert"], capsys)

    assert code == 0, err
    out = tmp_path / "embedded-sla2"
    assert json.loads((out / "sla2_config.json").read_text())["base_model"]["source"] == "embedded"
    inputs = embedded_example_inputs(frames=4, height=32, width=32)  # 1024 tokens: 16 key blocks
    reference = _forward(load_embedded_model(), inputs)
    assert (_forward(sla2cli.load(out, sparsity=0.0), inputs) - reference).abs().max().item() <= 1e-5
    assert torch.isfinite(_forward(sla2cli.load(out), inputs)).all()


def test_local_folder_round_trip_is_exact_at_sparsity_zero(wan_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", str(wan_folder), "--out", str(out)], capsys)
    assert code == 0, err
    assert "attention FLOP reduction" in stdout
    key_blocks = num_blocks(WAN.default_tokens(), 64)  # 0.97 is not a whole number of key blocks there
    kept = k_selected(key_blocks, 0.97)
    assert f"0.97 keeps {kept} of {key_blocks} key blocks (effective_sparsity {1 - kept / key_blocks:.3f})" in stdout
    base = WanTransformer3DModel.from_pretrained(wan_folder / "transformer").eval()
    inputs = small_inputs(WAN)
    reference = _forward(base, inputs)

    exact = sla2cli.load(out, sparsity=0.0)
    sparse = sla2cli.load(out)

    assert (_forward(exact, inputs) - reference).abs().max().item() <= 1e-5
    assert {layer.sparsity for layer in sla2_layers(sparse).values()} == {0.97}
    assert torch.isfinite(_forward(sparse, inputs)).all()


def test_api_converts_only_self_attention_in_place():
    model = build_random_model(WAN.name, full_size=False)
    inputs = small_inputs(WAN)
    reference = _forward(model, inputs)

    returned = sla2cli.convert(model, sparsity=0.0)

    assert returned is model
    assert sorted(sla2_processors(model)) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert all(isinstance(block.attn2.processor, WanAttnProcessor) for block in model.blocks)
    assert conversion_info(model).recipe == WAN.name
    assert (_forward(model, inputs) - reference).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="already converted"):
        sla2cli.convert(model)


def test_fused_projections_convert_exactly():
    model = build_random_model(WAN.name, full_size=False)
    inputs = small_inputs(WAN)
    reference = _forward(model, inputs)
    model.fuse_qkv_projections()
    for block in model.blocks:  # fused models compute q from to_qkv; stale to_q must not be used
        block.attn1.to_q.weight.data.zero_()

    sla2cli.convert(model, sparsity=0.0)

    assert model.blocks[0].attn1.fused_projections
    assert (_forward(model, inputs) - reference).abs().max().item() <= 1e-5


def test_api_recognises_the_embedded_architecture(tmp_path):
    recipe = all_recipes()["embedded"]
    model = build_random_model(recipe.name)
    inputs = example_inputs(recipe, "default", frames=4)

    sla2cli.convert(model)
    sla2cli.save(model, tmp_path / "out")

    info = conversion_info(model)
    assert (info.recipe, info.base.source) == ("embedded", "embedded")
    assert json.loads((tmp_path / "out" / "sla2_config.json").read_text())["base_weights"] == "referenced"
    assert torch.isfinite(_forward(model, inputs)).all()


def test_api_converts_both_experts_of_a_pipeline(tmp_path):
    recipe = all_recipes()["wan2.2-t2v-a14b"]
    pipeline = SimpleNamespace(**scaled_down_components(recipe))

    sla2cli.convert(pipeline, sparsity=0.5)
    sla2cli.save(pipeline, tmp_path / "out", include_base_weights=True)

    for model in (pipeline.transformer, pipeline.transformer_2):
        assert conversion_info(model).recipe == recipe.name
        assert {layer.sparsity for layer in sla2_layers(model).values()} == {0.5}
    loaded = sla2cli.load(tmp_path / "out")
    assert sorted(loaded) == ["transformer", "transformer_2"]


def test_recipe_dense_layers_stay_dense():
    model = build_random_model(WAN.name, full_size=False)
    keep_first = dataclasses.replace(WAN, dense_layers=(0,))

    convert_component(
        model, keep_first, component="transformer", base=BaseModelRef(source="memory"),
        sparsity=0.97, block_q=128, block_k=64,
    )

    assert sorted(sla2_processors(model)) == ["blocks.1.attn1"]
    assert isinstance(model.blocks[0].attn1.processor, WanAttnProcessor)
    assert [layer.sparsity for layer in attention_layers(model, keep_first)] == [None, 0.97]


def test_masked_or_cross_sequence_calls_fall_back_to_the_dense_processor():
    model = build_random_model(WAN.name, full_size=False)
    attn = model.blocks[0].attn1
    hidden = torch.randn(1, 40, 128)
    other = torch.randn(1, 24, 128)
    mask = torch.zeros(1, 1, 40, 40)
    dense = WanAttnProcessor()
    with torch.no_grad():
        expected_masked = dense(attn, hidden, None, mask, None)
        expected_cross = dense(attn, hidden, other, None, None)
    sla2cli.convert(model, sparsity=0.97)
    assert isinstance(attn.processor, WanSLA2Processor)
    with torch.no_grad():
        assert torch.equal(attn(hidden, None, mask, None), expected_masked)
        assert torch.equal(attn(hidden, other, None, None), expected_cross)


def test_cogvideox_joint_attention_with_a_mask_falls_back():
    recipe = all_recipes()["cogvideox-5b"]
    model = build_random_model(recipe.name, full_size=False)
    attn = model.transformer_blocks[0].attn1
    video, text = torch.randn(1, 40, 128), torch.randn(1, 8, 128)
    mask = torch.ones(1, 48, dtype=torch.bool)
    with torch.no_grad():
        expected = attn(video, text, attention_mask=mask)
    sla2cli.convert(model, sparsity=0.97)
    assert isinstance(attn.processor, CogVideoXSLA2Processor)
    with torch.no_grad():
        got = attn(video, text, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.gpu
def test_full_size_wan_480p_forward_on_gpu():
    model = build_random_model(WAN.name, dtype=torch.bfloat16, device="cuda")
    inputs = example_inputs(WAN, "480p", frames=81, dtype=torch.bfloat16, device="cuda")
    sla2cli.convert(model)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.shape == inputs["hidden_states"].shape
    assert torch.isfinite(out).all()


def test_reconverting_a_checkpoint_keeps_trained_parameters(wan_folder, tmp_path, capsys):
    model = sla2cli.load(wan_folder)
    with torch.no_grad():
        for layer in sla2_layers(model).values():
            layer.proj_q.add_(0.01 * torch.randn_like(layer.proj_q))
            layer.alpha_bias.fill_(0.3)
    sla2cli.save(model, tmp_path / "calibrated")

    code, _, err = run_cli(
        ["convert", str(tmp_path / "calibrated"), "--sparsity", "0.5", "--out", str(tmp_path / "half")], capsys
    )

    assert code == 0, err
    reloaded = sla2cli.load(tmp_path / "half")
    for name, layer in sla2_layers(reloaded).items():
        assert layer.sparsity == 0.5
        assert torch.equal(layer.proj_q, sla2_layers(model)[name].proj_q)
        assert torch.equal(layer.alpha_bias, torch.full_like(layer.alpha_bias, 0.3))


@pytest.mark.parametrize("quant", ["int8", "auto"])
def test_convert_records_the_quantisation_mode(wan_folder, tmp_path, capsys, quant):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", str(wan_folder), "--out", str(out), "--quant", quant], capsys)

    assert code == 0, err
    assert re.search(rf"sparse-branch quantisation\s+\S?\s*{quant}", stdout), stdout
    assert json.loads((out / "sla2_config.json").read_text())["quantization"] == quant
    assert {layer.quant for layer in sla2_layers(sla2cli.load(out)).values()} == {quant}


def test_reconverting_changes_or_keeps_the_quantisation_mode(wan_folder, tmp_path, capsys):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli(["convert", str(wan_folder), "--out", str(first)], capsys)[0] == 0
    assert json.loads((first / "sla2_config.json").read_text())["quantization"] == "none"
    assert run_cli(["convert", str(first), "--quant", "int8-fp8", "--out", str(second)], capsys)[0] == 0
    assert run_cli(["convert", str(second), "--sparsity", "0.5", "--out", str(third)], capsys)[0] == 0

    assert json.loads((second / "sla2_config.json").read_text())["quantization"] == "int8-fp8"
    assert json.loads((third / "sla2_config.json").read_text())["quantization"] == "int8-fp8"


def test_api_convert_quant_reaches_every_layer_and_is_checked_first():
    model = build_random_model(WAN.name, full_size=False)
    with pytest.raises(ValueError, match="quant must be one of none, int8, int8-fp8, auto"):
        sla2cli.convert(model, quant="int4")
    assert conversion_info(model) is None
    sla2cli.convert(model, quant="int8-fp8")
    assert {layer.quant for layer in sla2_layers(model).values()} == {"int8-fp8"}


# --- bad input: exit code 2, one line, nothing written ---------------------------------------------


def _assert_fails_cleanly(args, capsys, tmp_path, mentions):
    before = folder_listing(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert_user_error(code, err, mentions=mentions)
    assert folder_listing(tmp_path) == before


def test_folder_that_is_not_a_diffusers_model(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    _assert_fails_cleanly(["convert", str(folder), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "not a diffusers model folder")


def test_unsupported_architecture(tmp_path, capsys):
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8,
    )
    unet.save_pretrained(tmp_path / "unet" / "unet", safe_serialization=True)
    _assert_fails_cleanly(["convert", str(tmp_path / "unet"), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "unsupported architecture UNet2DModel")


def test_unsupported_head_dim(tmp_path, capsys):
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=16, ffn_dim=64, num_layers=1)
    model.save_pretrained(tmp_path / "wan32", safe_serialization=True)
    _assert_fails_cleanly(["convert", str(tmp_path / "wan32"), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          r"head dim of blocks.0.attn1 must be 64 or 128.*got 32")


def test_existing_out_without_overwrite(wan_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_fails_cleanly(["convert", str(wan_folder), "--out", str(out)], capsys, tmp_path, "--overwrite")
    _assert_fails_cleanly(["convert", str(wan_folder), "--out", str(out), "--overwrite"], capsys, tmp_path,
                          "not an sla2 checkpoint")


def test_overwrite_replaces_only_an_earlier_checkpoint(wan_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", str(wan_folder), "--out", str(out)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert", str(wan_folder), "--out", str(out), "--overwrite", "--sparsity", "0.5"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "sla2_attention.safetensors", "sla2_config.json"]
    assert json.loads((out / "sla2_config.json").read_text())["sparsity"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    (out / "notes.txt").write_text("mine")  # a checkpoint plus a user's file: refused, untouched
    _assert_fails_cleanly(["convert", str(wan_folder), "--out", str(out), "--overwrite"], capsys, tmp_path,
                          r"notes\.txt, which sla2 did not write")


@pytest.mark.parametrize("where", [".", "parent", "~", "symlink"])
def test_overwrite_never_touches_a_users_folder(wan_folder, tmp_path, monkeypatch, capsys, where):
    """--out ., a parent of the current folder, the home folder, or a link to a user's folder: refused."""
    users = tmp_path / "user" / "work"
    users.mkdir(parents=True)
    (users / "thesis.tex").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(users if where in (".", "parent") else elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    if where == "symlink":
        (tmp_path / "link").symlink_to(users)
    out = {".": ".", "parent": str(tmp_path / "user"), "~": "~", "symlink": str(tmp_path / "link")}[where]
    reason = {".": "the current folder", "parent": "a parent of the current folder", "~": "home folder",
              "symlink": "not an sla2 checkpoint"}[where]
    _assert_fails_cleanly(["convert", str(wan_folder), "--out", out, "--overwrite"], capsys, tmp_path, reason)
    assert (users / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncate", "garbage header"])
def test_damaged_base_weights(wan_folder, tmp_path, capsys, damage):
    weights = wan_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    _assert_fails_cleanly(["convert", str(wan_folder), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "truncated or corrupted")


def test_unknown_quant_mode(wan_folder, tmp_path, capsys):
    _assert_fails_cleanly(["convert", str(wan_folder), "--quant", "int4", "--out", str(tmp_path / "o")],
                          capsys, tmp_path, "--quant must be one of none, int8, int8-fp8, auto; got 'int4'")


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1"])
def test_sparsity_out_of_range(wan_folder, tmp_path, capsys, sparsity):
    _assert_fails_cleanly(["convert", str(wan_folder), "--sparsity", sparsity, "--out", str(tmp_path / "o")],
                          capsys, tmp_path, "--sparsity")


def test_unknown_recipe(wan_folder, tmp_path, capsys):
    _assert_fails_cleanly(["convert", str(wan_folder), "--recipe", "nope", "--out", str(tmp_path / "o")],
                          capsys, tmp_path, "unknown recipe 'nope'")


def test_recipe_of_another_class(wan_folder, tmp_path, capsys):
    _assert_fails_cleanly(["convert", str(wan_folder), "--recipe", "cogvideox-2b", "--out", str(tmp_path / "o")],
                          capsys, tmp_path, "expects CogVideoXTransformer3DModel")


@pytest.fixture()
def checkpoint(wan_folder, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    sla2cli.save(sla2cli.load(wan_folder), out)
    return out


def _edit_config(checkpoint: Path, edit) -> None:
    path = checkpoint / "sla2_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_checkpoint_with_newer_schema(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, lambda config: config.update(schema_version=99))
    _assert_fails_cleanly(["convert", str(checkpoint), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "schema version 99.*upgrade sla2")


def test_checkpoint_with_missing_keys(checkpoint, tmp_path, capsys):
    _edit_config(checkpoint, lambda config: [config.pop("sparsity"), config.pop("components")])
    _assert_fails_cleanly(["convert", str(checkpoint), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "missing keys components, sparsity")


def test_checkpoint_with_truncated_attention_file(checkpoint, tmp_path, capsys):
    path = checkpoint / "sla2_attention.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_fails_cleanly(["convert", str(checkpoint), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "truncated or corrupted")


def test_checkpoint_with_corrupted_attention_values(checkpoint, tmp_path, capsys):
    path = checkpoint / "sla2_attention.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8
    path.write_bytes(bytes(data))
    _assert_fails_cleanly(["convert", str(checkpoint), "--out", str(tmp_path / "o")], capsys, tmp_path,
                          "corrupted")


@pytest.mark.parametrize("change", ["drop a key", "add a key"])
def test_checkpoint_with_missing_or_unexpected_sla2_keys(checkpoint, tmp_path, capsys, change):
    path = checkpoint / "sla2_attention.safetensors"
    tensors = load_file(path)
    if change == "drop a key":
        tensors.pop("transformer.blocks.1.attn1.proj_k")
    else:
        tensors["transformer.blocks.7.attn1.proj_k"] = torch.eye(64)
    save_file(tensors, path)
    _edit_config(checkpoint, lambda config: config.update(attention_sha256=None))
    expected = "missing 1 keys" if change == "drop a key" else "1 unexpected keys"
    _assert_fails_cleanly(["convert", str(checkpoint), "--out", str(tmp_path / "o")], capsys, tmp_path, expected)
