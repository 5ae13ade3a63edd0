"""Model mode's subject: a converted transformer, inputs for one forward, and its attention shape.

The model comes from a recipe with random weights (no download; the weights do not change the cost of
a forward), or from a model or SLA2 checkpoint through `sla2cli.api.load`. Either way it ends up
converted; the dense run puts the original processors back, so both runs share every weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sla2cli.api import convert, load
from sla2cli.bench.cases import AttentionShape
from sla2cli.embedded.loading import build_embedded_model, embedded_example_inputs, keep_precision_sensitive_parts_fp32
from sla2cli.errors import UserError
from sla2cli.integration.conversion import conversion_info, model_settings, sla2_layers
from sla2cli.integration.recipes import EMBEDDED_SOURCE, Recipe, Resolution, get_recipe, recipe_for_hub_id
from sla2cli.sources.random_models import build_random_model, creation_defaults, example_inputs

PIXELS = re.compile(r"(?P<height>\d+)x(?P<width>\d+)")


@dataclass(frozen=True)
class ModelRequest:
    """What the user asked for; see `sla2 bench --help` for each field."""

    model: str
    resolution: str | None
    frames: int | None
    random_weights: bool
    scaled_down: bool
    sparsity: float | None
    dtype: torch.dtype
    device: torch.device
    seed: int = 0


@dataclass
class BenchModel:
    model: nn.Module  # converted: SLA2 processors on its self-attention modules
    recipe: Recipe
    inputs: dict[str, Any]
    size: Resolution
    sparsity: float
    description: str


def recipe_for_random_weights(name: str) -> Recipe:
    """--random-weights takes a recipe name or the Hub id of a supported model."""
    by_hub_id = recipe_for_hub_id(name)
    return by_hub_id if by_hub_id is not None else get_recipe(name)


def clip_size(recipe: Recipe, resolution: str | None, frames: int | None) -> Resolution:
    """A recipe resolution name (default: the recipe's) or HEIGHTxWIDTH, with --frames if given."""
    if resolution is None or resolution in recipe.resolutions:
        named = recipe.resolution(resolution)
        return Resolution(named.height, named.width, frames or named.frames)
    match = PIXELS.fullmatch(resolution)
    if match is None:
        raise UserError(
            f"--resolution {resolution!r} is neither one of {', '.join(recipe.resolutions)} nor HEIGHTxWIDTH"
        )
    return Resolution(int(match["height"]), int(match["width"]), frames or recipe.resolution().frames)


def _random_model(request: ModelRequest, recipe: Recipe) -> nn.Module:
    if recipe.source == EMBEDDED_SOURCE:
        torch.manual_seed(request.seed)
        with creation_defaults(request.dtype, request.device):
            model = build_embedded_model().eval().requires_grad_(False)
        if request.dtype != torch.float32:
            keep_precision_sensitive_parts_fp32(model)
    else:
        model = build_random_model(
            recipe.name, request.dtype, request.device, full_size=not request.scaled_down, seed=request.seed
        )
    return convert(model, sparsity=request.sparsity, recipe=recipe.name)


def _loaded_model(request: ModelRequest) -> tuple[nn.Module, Recipe]:
    loaded = load(request.model, sparsity=request.sparsity, dtype=request.dtype, device=request.device)
    model = loaded["transformer"] if isinstance(loaded, dict) else loaded
    return model, get_recipe(conversion_info(model).recipe)


def model_inputs(recipe: Recipe, model: nn.Module, size: Resolution, request: ModelRequest) -> dict[str, Any]:
    if recipe.source == EMBEDDED_SOURCE:
        return embedded_example_inputs(
            1, size.frames, size.height, size.width, seed=request.seed, dtype=request.dtype, device=request.device
        )
    return example_inputs(
        recipe, (size.height, size.width), size.frames, 1, config=dict(model.config),
        dtype=request.dtype, device=request.device, seed=request.seed,
    )


def prepare_model(request: ModelRequest) -> BenchModel:
    """Build or load, convert, and make inputs for one forward at the requested clip size."""
    if request.scaled_down and not request.random_weights:
        raise UserError("--scaled-down builds a small random model; add --random-weights")
    if request.random_weights:
        recipe = recipe_for_random_weights(request.model)
        if request.scaled_down and recipe.source == EMBEDDED_SOURCE:
            raise UserError("the embedded model is already small; drop --scaled-down")
        model = _random_model(request, recipe)
        weights = "random weights" + (", scaled down" if request.scaled_down else "")
        description = f"{recipe.title} ({weights})"
    else:
        model, recipe = _loaded_model(request)
        description = f"{recipe.title} from {request.model}"
    size = clip_size(recipe, request.resolution, request.frames)
    inputs = model_inputs(recipe, model, size, request)
    return BenchModel(model, recipe, inputs, size, model_settings(model)[0], description)


@contextmanager
def _recording_first_layer_shape(model: nn.Module, sink: list[tuple[int, ...]]) -> Iterator[None]:
    """Wrap the first SLA2 layer's forward (processors call it directly) to record its q shape."""
    layer = next(iter(sla2_layers(model).values()))
    original = layer.forward

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sink.append(tuple(q.shape))
        return original(q, k, v)

    layer.forward = recording
    try:
        yield
    finally:
        del layer.forward


def run_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """One transformer forward; the predicted velocity/noise tensor."""
    out = model(**inputs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def probe_attention_shape(bench: BenchModel) -> tuple[AttentionShape, torch.Tensor]:
    """(B, H, L, D) of one converted self-attention call, and the SLA2 model's output (no grad)."""
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), _recording_first_layer_shape(bench.model, shapes):
        out = run_forward(bench.model, bench.inputs)
    if not shapes:
        raise RuntimeError("the converted model never called SLA2 attention; its processors are not in use")
    return AttentionShape(*shapes[0]), out
