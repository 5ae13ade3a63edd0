"""The checkpoint format: config schema, SLA2 tensor file, model card, base weights, atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sla2cli
from sla2cli import __version__
from sla2cli.checkpoint import storage as checkpoint_module
from sla2cli.checkpoint.format import (
    SCHEMA_VERSION,
    TRAINING_METRICS_FILE,
    TRAINING_STATE_DIR,
    parse_config,
    read_config,
)
from sla2cli.checkpoint.storage import check_not_over_base, open_converted
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder, foreign_entries, replacement_refusal
from sla2cli.integration.conversion import conversion_info, sla2_layers
from sla2cli.sources.base import BaseModelRef, base_ref_from_name_or_path
from sla2cli.sources.locate import locate
from sla2cli.sources.random_models import build_random_model
from sla2cli.sources.safetensors_check import read_header
from sla2cli.sources.spec import parse_model_spec

WAN = "wan2.1-t2v-1.3b"


@pytest.fixture()
def converted():
    """A scaled-down random Wan, converted, known to come from a Hub id (so its base can be referenced)."""
    model = build_random_model(WAN, full_size=False)
    sla2cli.convert(model)
    hub = BaseModelRef(source="hub", repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", revision="abc123")
    model.sla2_conversion = dataclasses.replace(conversion_info(model), base=hub)
    return model


def test_referenced_checkpoint_contents(converted, tmp_path):
    out = sla2cli.save(converted, tmp_path / "ckpt")

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "sla2_attention.safetensors", "sla2_config.json"]
    config = json.loads((out / "sla2_config.json").read_text())
    assert config["schema_version"] == SCHEMA_VERSION
    assert config["sla2_version"] == __version__
    assert config["recipe"] == WAN
    assert config["base_model"] == {
        "source": "hub", "repo_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "revision": "abc123", "path": None,
    }
    assert config["base_weights"] == "referenced"
    assert (config["sparsity"], config["block_q"], config["block_k"]) == (0.97, 128, 64)
    assert config["quantization"] == "none"
    assert config["components"] == {
        "transformer": {
            "model_class": "WanTransformer3DModel",
            "converted_modules": ["blocks.0.attn1", "blocks.1.attn1"],
        }
    }
    tensors = load_file(out / "sla2_attention.safetensors")
    assert set(tensors) == {
        f"transformer.blocks.{layer}.attn1.{name}"
        for layer in (0, 1)
        for name in ("proj_q", "proj_k", "alpha_weight", "alpha_bias", "alpha_log_temperature")
    }
    assert all(t.dtype == torch.float32 for t in tensors.values())
    card = (out / "README.md").read_text()
    assert "base_model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in card
    assert "sla2cli.load(" in card
    assert "fewer than dense" in card


def test_model_without_a_reference_includes_its_weights_sharded(tmp_path, monkeypatch):
    model = build_random_model(WAN, full_size=False)
    sla2cli.convert(model, sparsity=0.0)
    with torch.no_grad():
        for layer in sla2_layers(model).values():
            layer.alpha_bias.fill_(0.25)
    monkeypatch.setattr(checkpoint_module, "MAX_SHARD_SIZE", "200KB")

    with pytest.raises(UserError, match="include_base_weights=True"):
        sla2cli.save(model, tmp_path / "refused", include_base_weights=False)
    out = sla2cli.save(model, tmp_path / "ckpt")

    assert read_config(out).base_weights == "included"
    shards = sorted((out / "transformer").glob("*.safetensors"))
    assert len(shards) > 1
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not any("processor" in key for shard in shards for key in load_file(shard))
    reloaded = sla2cli.load(out)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_failed_write_leaves_nothing(converted, tmp_path, monkeypatch):
    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module, "render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        sla2cli.save(converted, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_checkpoint(converted, tmp_path):
    out = sla2cli.save(converted, tmp_path / "ckpt")
    (out / "sla2_attention.safetensors").write_bytes(b"stale")
    with pytest.raises(UserError, match="--overwrite"):
        sla2cli.save(converted, out)
    sla2cli.save(converted, out, overwrite=True)
    assert load_file(out / "sla2_attention.safetensors")  # the stale file was replaced by a whole one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_never_deletes_a_users_file(converted, tmp_path):
    out = sla2cli.save(converted, tmp_path / "ckpt")
    (out / "notes.txt").write_text("mine")
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=r"notes\.txt, which sla2 did not write"):
        sla2cli.save(converted, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == listing
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(converted, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="not an sla2 checkpoint"):
        sla2cli.save(converted, out, overwrite=True)
    assert (out / "old.txt").read_text() == "old"


def test_an_empty_folder_may_be_written(converted, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    sla2cli.save(converted, out, overwrite=True)
    assert (out / "sla2_config.json").is_file()


def _checkpoint_like(folder, components=()):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"components": {name: {} for name in components}}
    (folder / "sla2_config.json").write_text(json.dumps(config))
    (folder / "sla2_attention.safetensors").write_bytes(b"x")
    (folder / "README.md").write_text("card")
    for name in components:
        (folder / name).mkdir()
        (folder / name / "config.json").write_text("{}")
        (folder / name / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"x")
        (folder / name / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    return folder


def test_replacement_rule_looks_inside_component_folders(tmp_path):
    folder = _checkpoint_like(tmp_path / "ckpt", components=["transformer"])
    assert replacement_refusal(folder) is None
    (folder / "transformer" / "my_lora.bin").write_bytes(b"x")
    assert foreign_entries(folder) == ["transformer/my_lora.bin"]
    assert "transformer/my_lora.bin" in replacement_refusal(folder)
    (folder / "vae").mkdir()  # a component the config does not list
    assert foreign_entries(folder) == ["transformer/my_lora.bin", "vae/"]


def test_replacement_rule_accepts_fine_tuning_state_and_nothing_else(tmp_path):
    """A fine-tuned checkpoint's training state and metrics are sla2's own; other names stay foreign."""
    folder = _checkpoint_like(tmp_path / "ckpt")
    (folder / TRAINING_STATE_DIR).mkdir()
    (folder / TRAINING_STATE_DIR / "optimizer.safetensors").write_bytes(b"x")
    (folder / TRAINING_METRICS_FILE).write_text("step,loss\n")
    assert foreign_entries(folder) == []
    assert replacement_refusal(folder) is None
    assert check_output_folder(folder, overwrite=True) == folder.resolve()
    (folder / "metrics.csv").write_text("step,loss\n")
    assert foreign_entries(folder) == ["metrics.csv"]
    with pytest.raises(UserError, match="metrics.csv"):
        check_output_folder(folder, overwrite=True)


def test_protected_folders_are_never_replaced(tmp_path, monkeypatch):
    """The current folder, its parents and the home folder are refused even when they look like a checkpoint."""
    home = _checkpoint_like(tmp_path / "home")
    work = _checkpoint_like(tmp_path / "a" / "b")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, reason in ((".", "the current folder"), (str(tmp_path / "a"), "a parent of the current folder"),
                        (str(tmp_path), "a parent"), ("~", "the home folder"), (str(home), "the home folder")):
        with pytest.raises(UserError, match=reason):
            check_output_folder(Path(out), overwrite=True)


def test_symlinks_are_resolved_before_deciding(converted, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "data.txt").write_text("mine")
    (tmp_path / "to-users").symlink_to(users)
    with pytest.raises(UserError, match="not an sla2 checkpoint"):
        sla2cli.save(converted, tmp_path / "to-users", overwrite=True)
    assert sorted(p.name for p in users.iterdir()) == ["data.txt"]

    real = sla2cli.save(converted, tmp_path / "real")
    link = tmp_path / "to-real"
    link.symlink_to(real)
    sla2cli.save(converted, link, overwrite=True)  # the checkpoint it points to is replaced; the link stays
    assert link.is_symlink() and (real / "sla2_config.json").is_file()

    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        sla2cli.save(converted, tmp_path / "dangling")
    assert not (tmp_path / "missing").exists()


def test_a_file_put_into_the_output_during_the_run_stops_the_swap(converted, tmp_path, monkeypatch):
    out = sla2cli.save(converted, tmp_path / "ckpt")
    real_render = checkpoint_module.render_model_card

    def user_drops_a_file(*args, **kwargs):
        (out / "late.txt").write_text("mine")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "render_model_card", user_drops_a_file)
    with pytest.raises(UserError, match="late.txt"):
        sla2cli.save(converted, out, overwrite=True)
    assert (out / "late.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _valid_config() -> dict:
    return {
        "schema_version": 1, "sla2_version": "0.1.0", "recipe": WAN,
        "base_model": {"source": "hub", "repo_id": "a/b", "revision": "c", "path": None},
        "base_weights": "referenced",
        "components": {
            "transformer": {"model_class": "WanTransformer3DModel", "converted_modules": ["blocks.0.attn1"]}
        },
        "sparsity": 0.97, "block_q": 128, "block_k": 64, "quantization": "none",
    }


def test_config_round_trip(tmp_path):
    config = parse_config(_valid_config(), tmp_path / "sla2_config.json")
    again = parse_config(config.to_json(), tmp_path / "sla2_config.json")
    assert again == config


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(schema_version=SCHEMA_VERSION + 1), "newer than this sla2 reads"),
        (lambda c: c.pop("block_k"), "missing keys block_k"),
        (lambda c: c.update(base_weights="copied"), "base_weights must be one of"),
        (lambda c: c.update(quantization="int3"), "quantization 'int3'"),
        (lambda c: c.update(sparsity=1.5), "sparsity must be"),
        (lambda c: c.update(components={}), "components must be"),
        (lambda c: c.update(base_model={"source": "memory"}), "neither included nor referenced"),
    ],
)
def test_config_problems_are_user_errors(tmp_path, edit, message):
    data = _valid_config()
    edit(data)
    with pytest.raises(UserError, match=message):
        parse_config(data, tmp_path / "sla2_config.json")


def test_read_config_of_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not an SLA2 checkpoint"):
        read_config(tmp_path)


def test_base_reference_from_a_hub_cache_path(tmp_path):
    snapshot = tmp_path / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" / "snapshots" / "0123abcd" / "transformer"
    snapshot.mkdir(parents=True)
    assert base_ref_from_name_or_path(str(snapshot)) == BaseModelRef(
        source="hub", repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", revision="0123abcd"
    )
    assert base_ref_from_name_or_path("org/name") == BaseModelRef(source="hub", repo_id="org/name")
    assert base_ref_from_name_or_path(str(tmp_path)) == BaseModelRef(source="local", path=str(tmp_path.resolve()))
    assert base_ref_from_name_or_path(None) == BaseModelRef(source="memory")


def test_output_may_not_replace_the_base_folder(tmp_path):
    base = BaseModelRef(source="local", path=str(tmp_path / "models" / "wan"))
    with pytest.raises(UserError, match="base model folder"):
        check_not_over_base(tmp_path / "models", base)
    check_not_over_base(tmp_path / "elsewhere", base)


def test_safetensors_header_check(converted, tmp_path):
    out = sla2cli.save(converted, tmp_path / "ckpt")
    path = out / "sla2_attention.safetensors"
    assert "transformer.blocks.0.attn1.proj_q" in read_header(path)
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(UserError, match="expected .* bytes"):
        read_header(path)
    path.write_bytes(b"\x01")
    with pytest.raises(UserError, match="shorter than the header"):
        read_header(path)


@pytest.mark.parametrize("quant", ["int8-fp8", "auto"])
def test_quantisation_mode_round_trips_through_a_checkpoint(tmp_path, quant):
    from fixtures_hub import small_inputs

    from sla2cli.integration.recipes import get_recipe

    model = build_random_model(WAN, full_size=False)
    sla2cli.convert(model, sparsity=0.5, quant=quant)
    assert {layer.quant for layer in sla2_layers(model).values()} == {quant}
    out = sla2cli.save(model, tmp_path / "ckpt")

    assert json.loads((out / "sla2_config.json").read_text())["quantization"] == quant
    assert f"| quantisation | {quant} |" in (out / "README.md").read_text()
    reloaded = sla2cli.load(out)
    assert {layer.quant for layer in sla2_layers(reloaded).values()} == {quant}
    inputs = small_inputs(get_recipe(WAN))
    unquantised = sla2cli.load(out, quant="none")
    assert {layer.quant for layer in sla2_layers(unquantised).values()} == {"none"}
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        again = reloaded(**inputs, return_dict=False)[0]
        plain = unquantised(**inputs, return_dict=False)[0]

    def rel(x: torch.Tensor) -> float:
        return float((x - expected).norm() / expected.norm())

    if quant == "auto":  # stored as asked, resolved per call: on a CPU that is the unquantised op
        # Same weights, bit for bit; the reloaded tensors' memory layout may take other float paths (~1e-7).
        assert torch.equal(again, plain) and rel(again) < 1e-5
        return
    # The reloaded model differs by float noise that low-bit rounding amplifies a little; the mode
    # itself moves the output an order of magnitude more.
    assert rel(again) < 0.2 * rel(plain)


def test_config_accepts_every_requestable_quantisation_mode(tmp_path):
    for mode in ("none", "int8-fp8", "int8", "auto"):
        data = {**_valid_config(), "quantization": mode}
        assert parse_config(data, tmp_path / "sla2_config.json").quantization == mode


def test_config_reads_the_earlier_name_of_the_int8_mode(tmp_path):
    data = {**_valid_config(), "quantization": "int8-fp16"}
    assert parse_config(data, tmp_path / "sla2_config.json").quantization == "int8"
    with pytest.raises(UserError, match=r"quantization \['int8'\] is not one of"):
        parse_config({**_valid_config(), "quantization": ["int8"]}, tmp_path / "sla2_config.json")


def test_unknown_quantisation_in_a_stored_config_fails_loudly(tmp_path):
    model = build_random_model(WAN, full_size=False)
    sla2cli.convert(model)
    out = sla2cli.save(model, tmp_path / "ckpt")
    config = json.loads((out / "sla2_config.json").read_text())
    config["quantization"] = "int4"
    (out / "sla2_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantization 'int4' is not one of none, int8, int8-fp8, auto"):
        sla2cli.load(out)


def test_layers_with_different_quantisation_cannot_be_saved(converted, tmp_path):
    next(iter(sla2_layers(converted).values())).quant = "int8"
    with pytest.raises(ValueError, match="disagree on the quantisation mode"):
        sla2cli.save(converted, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_open_converted_opens_a_checkpoint_or_converts_a_base_folder(tmp_path):
    """One opener for `sla2cli.load` and `sla2 convert`: a base folder is converted with its recipe's defaults
    (skeletons without weights), a checkpoint comes back with its own trained SLA2 parameters."""

    def where(folder: Path):
        return locate(parse_model_spec(str(folder)), offline=True)

    base = tmp_path / "wan-small"
    build_random_model(WAN, full_size=False).save_pretrained(base / "transformer", safe_serialization=True)
    skeleton = open_converted(where(base), weights=False, dtype=torch.float32, device="cpu")
    assert set(skeleton) == {"transformer"}
    assert conversion_info(skeleton["transformer"]).recipe == WAN
    assert any(p.is_meta for p in skeleton["transformer"].parameters())  # no base weights read

    model = open_converted(where(base), weights=True, dtype=torch.float32, device="cpu",
                           sparsity=0.5)["transformer"]
    layer = next(iter(sla2_layers(model).values()))
    assert layer.sparsity == 0.5
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.25)  # "trained"
    sla2cli.save(model, tmp_path / "ckpt")
    location = where(tmp_path / "ckpt")
    assert location.holds_checkpoint() and not where(base).holds_checkpoint()
    reopened = open_converted(location, weights=True, dtype=torch.float32, device="cpu", sparsity=0.75)
    again = next(iter(sla2_layers(reopened["transformer"]).values()))
    assert again.sparsity == 0.75
    for mine, theirs in zip(layer.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(theirs, mine)
