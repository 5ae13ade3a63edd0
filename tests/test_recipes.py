"""Recipes: shipped files parse, describe full-size models, and turn resolutions into token counts."""

from __future__ import annotations

import pytest
import torch
from fixtures_hub import run_cli

from sla2cli.errors import UserError
from sla2cli.flops import (
    LayerAttention,
    dense_attention_flops,
    estimate_model_flops,
    sla2_attention_flops,
)
from sla2cli.integration.conversion import self_attention_modules
from sla2cli.integration.recipes import all_recipes, get_recipe, recipe_for_architecture, recipe_for_hub_id
from sla2cli.sources.components import build_skeleton
from sla2cli.sources.random_models import build_random_model, example_inputs

REQUIRED = {
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan2.1-i2v-14b-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
    "wan2.2-t2v-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "wan2.2-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "cogvideox-2b": "THUDM/CogVideoX-2b",
    "cogvideox-5b": "THUDM/CogVideoX-5b",
    "embedded": None,
}
# Published parameter counts of the transformers, in billions (rounded to two digits).
PARAMETERS = {
    "wan2.1-t2v-1.3b": 1.42, "wan2.1-t2v-14b": 14.29, "wan2.1-i2v-14b-720p": 16.39,
    "wan2.2-t2v-a14b": 14.29, "wan2.2-ti2v-5b": 5.00, "cogvideox-2b": 1.69, "cogvideox-5b": 5.57,
}


def test_required_recipes_ship_with_their_hub_ids():
    recipes = all_recipes()
    assert {name: recipes[name].hub_id for name in REQUIRED} == REQUIRED
    assert recipes["wan2.2-t2v-a14b"].components == ("transformer", "transformer_2")
    assert recipes["embedded"].source == "embedded"


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_architecture_is_the_full_size_model(name):
    recipe = get_recipe(name)
    skeleton = build_skeleton(recipe.model_class, recipe.architecture)
    billions = sum(p.numel() for p in skeleton.parameters()) / 1e9
    assert billions == pytest.approx(PARAMETERS[name], abs=0.01)
    layers = self_attention_modules(skeleton, recipe)
    assert len(layers) == recipe.architecture["num_layers"]
    assert all(not module.is_cross_attention for _, module in layers.values())


@pytest.mark.parametrize(
    ("name", "latent", "tokens"),
    [
        ("wan2.1-t2v-1.3b", (21, 60, 104), 32760),
        ("wan2.1-t2v-14b", (21, 90, 160), 75600),
        ("wan2.2-ti2v-5b", (31, 44, 80), 27280),
        ("cogvideox-5b", (13, 60, 90), 17550 + 226),
        ("embedded", (8, 64, 64), 8192),
    ],
)
def test_default_resolution_token_counts(name, latent, tokens):
    recipe = get_recipe(name)
    assert recipe.video.latent_shape(recipe.resolution()) == latent
    assert recipe.default_tokens() == tokens


def test_wan_480p_is_32760_tokens():
    recipe = get_recipe("wan2.1-t2v-14b")
    assert recipe.video.self_attention_length(recipe.resolution("480p")) == 32760
    with pytest.raises(UserError, match="no resolution '1080p'"):
        recipe.resolution("1080p")


def test_layer_index_matches_only_self_attention():
    layout = get_recipe("wan2.1-t2v-1.3b").attention
    assert layout.layer_index("blocks.12.attn1") == 12
    assert layout.layer_index("blocks.12.attn2") is None
    assert layout.layer_index("blocks.12.attn1.to_q") is None
    assert get_recipe("cogvideox-2b").attention.layer_index("transformer_blocks.3.attn1") == 3


def test_recipe_lookup():
    assert get_recipe("WAN2.1-T2V-1.3B").name == "wan2.1-t2v-1.3b"
    assert recipe_for_hub_id("wan-ai/wan2.1-t2v-1.3b-diffusers").name == "wan2.1-t2v-1.3b"
    assert recipe_for_hub_id("someone/else") is None
    with pytest.raises(UserError, match="unknown recipe"):
        get_recipe("sdxl")


def test_recipe_for_architecture():
    i2v = dict(get_recipe("wan2.1-i2v-14b-720p").architecture)
    small_i2v = dict(i2v, num_layers=2, num_attention_heads=2, attention_head_dim=64, added_kv_proj_dim=128)
    assert recipe_for_architecture("WanTransformer3DModel", i2v, {"transformer"}).name == "wan2.1-i2v-14b-720p"
    assert recipe_for_architecture("WanTransformer3DModel", small_i2v, {"transformer"}).name == "wan2.1-i2v-14b-720p"
    t2v = get_recipe("wan2.1-t2v-14b").architecture
    assert recipe_for_architecture("WanTransformer3DModel", t2v, {"transformer"}).name == "wan2.1-t2v-14b"
    both = {"transformer", "transformer_2", "vae"}
    assert recipe_for_architecture("WanTransformer3DModel", t2v, both).name == "wan2.2-t2v-a14b"
    with pytest.raises(UserError, match="unsupported architecture FluxTransformer2DModel"):
        recipe_for_architecture("FluxTransformer2DModel", {}, {"transformer"})


def test_flop_reduction_at_wan_480p():
    dense = dense_attention_flops(32760, 128, heads=12)
    sla2 = sla2_attention_flops(32760, 12, 128, 0.97, 128, 64)
    # 15 of 512 key blocks exact (2.9% of the keys) plus the linear branch (D / L = 0.4%): about 30x.
    assert dense / sla2 == pytest.approx(30.06, abs=0.01)
    assert sla2_attention_flops(32760, 12, 128, 0.0, 128, 64) >= dense
    layers = [LayerAttention(12, 128, None)] + [LayerAttention(12, 128, 0.97)] * 29
    estimate = estimate_model_flops(layers, 32760)
    assert estimate.reduction == pytest.approx(30 * dense / (dense + 29 * sla2))


def test_list_recipes_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, stdout, _ = run_cli(["convert", "--list-recipes"], capsys)
    assert code == 0
    for name, hub_id in REQUIRED.items():
        assert name in stdout
        if hub_id:
            assert hub_id in stdout
    assert "32,760" in stdout


@pytest.mark.parametrize("columns", [80, 60])
def test_list_recipes_shows_whole_names_on_a_narrow_terminal(capsys, monkeypatch, columns):
    """The names are what --recipe takes: never cut, first on their line; the details wrap beside them."""
    monkeypatch.setenv("COLUMNS", str(columns))
    code, stdout, _ = run_cli(["convert", "--list-recipes"], capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    first_words = {line.split()[0] for line in lines if line.strip()}
    assert set(REQUIRED) <= first_words
    assert "…" not in stdout
    if columns == 80:
        assert all(hub_id in stdout for hub_id in REQUIRED.values() if hub_id)


def test_full_size_random_model_and_inputs_for_wan_480p():
    model = build_random_model("wan2.1-t2v-1.3b", dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.42e9, rel=0.01)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # diffusers keeps modulation tables in fp32
    inputs = example_inputs("wan2.1-t2v-1.3b", "480p", frames=81, batch=1)
    assert inputs["hidden_states"].shape == (1, 16, 21, 60, 104)
    assert inputs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs["timestep"].shape == (1,)
    i2v = example_inputs("wan2.1-i2v-14b-720p", "720p", frames=81, batch=2)
    assert i2v["hidden_states"].shape == (2, 36, 21, 90, 160)
    assert i2v["encoder_hidden_states_image"].shape == (2, 257, 1280)
    cog = example_inputs("cogvideox-5b", "480p", frames=49)
    assert cog["hidden_states"].shape == (1, 13, 16, 60, 90)
    assert cog["image_rotary_emb"][0].shape == (17550, 64)


def test_calibration_block_is_parsed_and_checked():
    from sla2cli.integration.recipes import CalibrationDefaults, _parse_calibration

    for recipe in all_recipes().values():
        assert isinstance(recipe.calibration, CalibrationDefaults)
        assert recipe.calibration.timesteps and recipe.calibration.alpha_steps > 0
    good = {"clips": 2, "timesteps": [0.9, 0.1], "router_steps": 10, "router_learning_rate": 0.01, "alpha_steps": 5,
            "alpha_learning_rate": 0.05, "tau": 0.1}
    assert _parse_calibration(good, "x.json").timesteps == (0.9, 0.1)
    for bad in ({**good, "iterations": 3}, {**good, "timesteps": [1.5]}, {**good, "tau": 0}, {**good, "clips": 0},
                {key: value for key, value in good.items() if key != "alpha_steps"}):
        with pytest.raises(ValueError, match="x.json"):
            _parse_calibration(bad, "x.json")
