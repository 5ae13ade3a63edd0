"""Every recipe's architecture, served from an offline Hub cache under its Hub id, converts and runs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fixtures_hub import (
    assert_user_error,
    folder_listing,
    publish_to_hub_cache,
    run_cli,
    scaled_down_components,
    small_inputs,
    use_hub_cache,
)

import sla2cli
from sla2cli.integration.conversion import set_sparsity
from sla2cli.integration.recipes import all_recipes

HUB_RECIPES = [recipe for recipe in all_recipes().values() if recipe.source == "hub"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Error lines are judged whole; keep rich from wrapping them at 80 columns."""
    monkeypatch.setenv("COLUMNS", "400")


@pytest.mark.parametrize("recipe", HUB_RECIPES, ids=lambda recipe: recipe.name)
def test_recipe_converts_from_hub_cache_and_runs(recipe, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    base = scaled_down_components(recipe)
    commit = publish_to_hub_cache(cache, recipe.hub_id, base)
    use_hub_cache(monkeypatch, cache)
    out = tmp_path / "converted"

    code, stdout, err = run_cli(["convert", recipe.hub_id, "--out", str(out)], capsys)

    assert code == 0, err
    assert recipe.name in stdout
    config = json.loads((out / "sla2_config.json").read_text())
    assert config["recipe"] == recipe.name
    assert config["base_model"] == {"source": "hub", "repo_id": recipe.hub_id, "revision": commit, "path": None}
    assert sorted(config["components"]) == sorted(recipe.components)
    inputs = small_inputs(recipe)
    loaded = sla2cli.load(out, sparsity=0.0)
    loaded = loaded if isinstance(loaded, dict) else {"transformer": loaded}
    assert sorted(loaded) == sorted(recipe.components)
    for name, model in base.items():
        with torch.no_grad():
            reference = model(**inputs, return_dict=False)[0]
            at_zero = loaded[name](**inputs, return_dict=False)[0]
            set_sparsity(loaded[name], recipe.sparsity)
            at_097 = loaded[name](**inputs, return_dict=False)[0]
        assert (at_zero - reference).abs().max().item() <= 1e-5
        assert torch.isfinite(at_097).all()
        assert (at_097 - reference).abs().max().item() > 1e-4  # 97% sparsity really routes


def test_revision_pins_the_commit(tmp_path, monkeypatch, capsys):
    recipe = all_recipes()["wan2.1-t2v-1.3b"]
    cache = tmp_path / "hub"
    commit = publish_to_hub_cache(cache, recipe.hub_id, scaled_down_components(recipe))
    use_hub_cache(monkeypatch, cache)
    out = tmp_path / "converted"

    code, _, err = run_cli(["convert", f"{recipe.hub_id}@{commit}", "--out", str(out)], capsys)

    assert code == 0, err
    assert json.loads((out / "sla2_config.json").read_text())["base_model"]["revision"] == commit


def test_offline_flag_uses_only_the_cache(tmp_path, monkeypatch, capsys):
    recipe = all_recipes()["wan2.1-t2v-1.3b"]
    cache = tmp_path / "hub"
    publish_to_hub_cache(cache, recipe.hub_id, scaled_down_components(recipe))
    use_hub_cache(monkeypatch, cache)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    code, _, err = run_cli(["convert", recipe.hub_id, "--offline", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err

    code, _, err = run_cli(["convert", "nobody/nothing", "--offline", "--out", str(tmp_path / "b")], capsys)
    assert_user_error(code, err, mentions="not in the Hugging Face cache")
    assert not (tmp_path / "b").exists()


def test_unknown_hub_id_offline_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    use_hub_cache(monkeypatch, tmp_path / "empty-cache")
    before = folder_listing(tmp_path)

    code, _, err = run_cli(["convert", "Wan-AI/No-Such-Model", "--out", str(tmp_path / "out")], capsys)

    assert_user_error(code, err, mentions="Wan-AI/No-Such-Model")
    assert folder_listing(tmp_path) == before


def test_cached_repo_without_the_transformer_weights_fails_cleanly(tmp_path, monkeypatch, capsys):
    recipe = all_recipes()["wan2.1-t2v-1.3b"]
    cache = tmp_path / "hub"
    commit = publish_to_hub_cache(cache, recipe.hub_id, scaled_down_components(recipe))
    snapshot = cache / f"models--{recipe.hub_id.replace('/', '--')}" / "snapshots" / commit
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    use_hub_cache(monkeypatch, cache)

    code, _, err = run_cli(["convert", recipe.hub_id, "--out", str(tmp_path / "out")], capsys)

    assert_user_error(code, err, mentions="no safetensors weights")
    assert not (tmp_path / "out").exists()


def test_hub_id_is_matched_case_insensitively_and_recipe_can_be_named(tmp_path, monkeypatch, capsys):
    recipe = all_recipes()["cogvideox-2b"]
    cache = tmp_path / "hub"
    publish_to_hub_cache(cache, "someone/my-cogvideox-finetune", scaled_down_components(recipe))
    use_hub_cache(monkeypatch, cache)
    out = tmp_path / "out"

    code, _, err = run_cli(
        ["convert", "someone/my-cogvideox-finetune", "--recipe", "cogvideox-2b", "--sparsity", "0.9",
         "--out", str(out)],
        capsys,
    )

    assert code == 0, err
    config = json.loads((out / "sla2_config.json").read_text())
    assert (config["recipe"], config["sparsity"]) == ("cogvideox-2b", 0.9)


@pytest.mark.parametrize("text", ["./mymodels/wan", "/no/such/models/wan", "~/no-such-models/wan", "mymodels/wan/",
                                  "org/mymodels/wan", "wan"])
def test_a_missing_local_looking_folder_is_no_such_folder(text, tmp_path, monkeypatch, capsys):
    """A path that cannot be a Hub id never reaches the Hub: the user hears about the folder only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("sla2cli.sources.hub.snapshot_download", no_hub)
    for command in (["convert", text, "--out", str(tmp_path / "out")], ["report", text]):
        code, _, err = run_cli(command, capsys)
        assert_user_error(code, err, mentions=f"no such folder {re.escape(text)}")
        assert "network" not in err and "Hub for" not in err
    assert folder_listing(tmp_path) == []


@pytest.mark.parametrize("offline", [False, True])
def test_a_missing_folder_spelled_like_a_hub_id_names_both(offline, tmp_path, monkeypatch, capsys):
    """`mymodels/wan` may be a folder or a Hub id: when neither exists, the error says both."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    use_hub_cache(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)

    def unreachable(*args, **kwargs):  # what huggingface_hub raises when the Hub cannot be reached
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr("sla2cli.sources.hub.snapshot_download", unreachable)
    code, _, err = run_cli(["convert", "mymodels/wan", "--out", str(tmp_path / "out")], capsys)
    hub_reason = "is not in the Hugging Face cache" if offline else "could not reach the Hub for mymodels/wan"
    assert_user_error(code, err, mentions=f"^error: no such folder mymodels/wan, and as a Hub id: .*{hub_reason}")
    assert not (tmp_path / "out").exists()

    (tmp_path / "mymodels" / "wan").mkdir(parents=True)  # the folder, once it exists, wins over the Hub id
    code, _, err = run_cli(["convert", "mymodels/wan", "--out", str(tmp_path / "out")], capsys)
    assert_user_error(code, err, mentions="not a diffusers model folder")
