"""Tile order of video tokens: the permutation itself, and converted models that attend in it."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_hub import run_cli, small_inputs

import sla2cli
from sla2cli.checkpoint.format import CONFIG_FILE, read_config
from sla2cli.errors import UserError
from sla2cli.integration.conversion import convert_component, model_token_tile, sla2_layers, sla2_processors
from sla2cli.integration.recipes import all_recipes
from sla2cli.integration.token_order import check_token_tile, tile_permutation
from sla2cli.report.capture import wrapped_forwards
from sla2cli.sources.base import BaseModelRef
from sla2cli.sources.random_models import build_random_model

WAN = all_recipes()["wan2.1-t2v-1.3b"]
COGVIDEOX = all_recipes()["cogvideox-5b"]


def _coordinates(grid: tuple[int, int, int]) -> torch.Tensor:
    """(tokens, 3) frame, row and column of each token of a raster-flattened grid."""
    axes = torch.meshgrid(*(torch.arange(side) for side in grid), indexing="ij")
    return torch.stack([axis.flatten() for axis in axes], dim=1)


@pytest.mark.parametrize("grid", [(4, 8, 8), (3, 5, 7), (1, 1, 9)])
def test_tile_order_is_a_permutation_with_its_inverse(grid):
    order, inverse = tile_permutation(grid, (2, 4, 4))
    tokens = grid[0] * grid[1] * grid[2]
    assert torch.equal(order.sort().values, torch.arange(tokens))
    values = torch.randn(tokens)
    assert torch.equal(values[order][inverse], values)


@pytest.mark.parametrize("block", [32, 16])
def test_blocks_of_a_divisible_grid_are_compact_cubes(block):
    grid, tile = (4, 8, 12), (2, 4, 4)
    order, _ = tile_permutation(grid, tile)
    coordinates = _coordinates(grid)[order].view(-1, block, 3)
    extents = coordinates.amax(dim=1) - coordinates.amin(dim=1) + 1
    expected = torch.tensor([2, 4, 4]) if block == 32 else torch.tensor([1, 4, 4])
    assert torch.equal(extents, expected.expand_as(extents))


def test_partial_tiles_keep_each_tile_together():
    grid, tile = (3, 5, 6), (2, 4, 4)
    order, _ = tile_permutation(grid, tile)
    coordinates = _coordinates(grid)[order]
    tile_of = (coordinates // torch.tensor(tile)).tolist()
    runs = [tile_of[0]] + [b for a, b in zip(tile_of, tile_of[1:], strict=False) if a != b]
    assert len(runs) == len({tuple(t) for t in runs}) == 2 * 2 * 2  # each tile appears as one run


@pytest.mark.parametrize("bad", [[2, 4], [2, 0, 4], [2, 4.0, 4], "2x4x4", [True, 4, 4]])
def test_a_bad_tile_is_refused(bad):
    with pytest.raises(ValueError, match="three positive integers"):
        check_token_tile(bad, "token_tile")
    assert check_token_tile(None, "token_tile") is None


def _convert(model, recipe, sparsity: float, tile):
    convert_component(
        model, recipe, component="transformer", base=BaseModelRef(source="memory"),
        sparsity=sparsity, block_q=16, block_k=16, token_tile=tile,
    )
    return model


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _captured_queries(model, inputs) -> dict[str, torch.Tensor]:
    queries = {}

    def make_forward(name, layer, original):
        def forward(q, k, v):
            queries[name] = q.detach().clone()
            return original(q, k, v)

        return forward

    with wrapped_forwards(sla2_layers(model), make_forward):
        _forward(model, inputs)
    return queries


@pytest.mark.parametrize("recipe", [WAN, COGVIDEOX], ids=["wan", "cogvideox"])
def test_a_tiled_model_attends_in_tile_order_and_gives_tokens_back_in_place(recipe):
    inputs = small_inputs(recipe)
    dense = build_random_model(recipe.name, full_size=False)
    reference = _forward(dense, inputs)
    raster = _convert(build_random_model(recipe.name, full_size=False), recipe, 0.0, None)
    tiled = _convert(build_random_model(recipe.name, full_size=False), recipe, 0.0, (2, 4, 4))

    # With every block kept, attention ignores token order: a tiled model is exact only if it permutes
    # the rotary tables with the tokens and puts its outputs back in raster order.
    assert (_forward(tiled, inputs) - reference).abs().max().item() <= 1e-5
    raster_queries, tiled_queries = _captured_queries(raster, inputs), _captured_queries(tiled, inputs)
    for name, query in raster_queries.items():
        grid = sla2_processors(tiled)[name].token_order.grid
        text = query.shape[2] - grid[0] * grid[1] * grid[2]  # CogVideoX's joint sequence starts with the text
        assert text == (inputs["encoder_hidden_states"].shape[1] if recipe.video.text_in_self_attention else 0)
        video = query[:, :, text:]
        order, _ = tile_permutation(grid, (2, 4, 4))
        torch.testing.assert_close(tiled_queries[name][:, :, text:], video[:, :, order], rtol=0, atol=1e-5)
        torch.testing.assert_close(tiled_queries[name][:, :, :text], query[:, :, :text], rtol=0, atol=1e-5)


def test_sparse_tiled_and_raster_models_differ():
    inputs = small_inputs(WAN)
    raster = _convert(build_random_model(WAN.name, full_size=False), WAN, 0.9, None)
    tiled = _convert(build_random_model(WAN.name, full_size=False), WAN, 0.9, (2, 4, 4))
    assert not torch.allclose(_forward(raster, inputs), _forward(tiled, inputs), atol=1e-4)


def test_a_tiled_layer_called_outside_its_model_says_so():
    model = _convert(build_random_model(WAN.name, full_size=False), WAN, 0.9, (2, 4, 4))
    with pytest.raises(ValueError, match="outside a forward of its converted model"), torch.no_grad():
        model.blocks[0].attn1(torch.randn(1, 40, 128), None, None, None)


def test_a_bad_tile_leaves_the_model_unconverted():
    model = build_random_model(WAN.name, full_size=False)
    with pytest.raises(UserError, match="token_tile"):
        _convert(model, WAN, 0.9, (2, 4))
    assert not sla2_layers(model)


def test_a_checkpoint_records_its_tile_and_loads_with_it(tmp_path, capsys):
    folder = tmp_path / "wan-small"
    build_random_model(WAN.name, full_size=False).save_pretrained(folder / "transformer", safe_serialization=True)
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    assert WAN.token_tile is None and read_config(out).token_tile is None
    assert "| token order | raster |" in (out / "README.md").read_text()

    config = json.loads((out / CONFIG_FILE).read_text())
    config["token_tile"] = [2, 4, 4]
    (out / CONFIG_FILE).write_text(json.dumps(config))
    assert model_token_tile(sla2cli.load(out)) == (2, 4, 4)
    del config["token_tile"]  # written before tile orders existed: raster
    (out / CONFIG_FILE).write_text(json.dumps(config))
    assert model_token_tile(sla2cli.load(out)) is None


def test_the_embedded_recipe_tiles_its_blocks_into_cubes():
    recipe = all_recipes()["embedded"]
    tile = recipe.token_tile
    assert tile is not None and tile[0] * tile[1] * tile[2] % recipe.block_q == 0
