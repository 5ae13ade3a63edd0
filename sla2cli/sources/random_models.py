"""Recipe architectures with random weights, and forward inputs for them: no download needed.

Used for timing a full-size model on a GPU (the weights do not change the cost of a forward pass) and,
scaled down, for testing that every recipe's diffusers class converts and runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import diffusers
import torch

from sla2cli.integration.recipes import IMAGE_ARGUMENT, IMAGE_TOKENS, Recipe, Resolution, get_recipe
from sla2cli.sources.components import model_class

# Per diffusers class: the sizes a scaled-down copy uses. Head dim 64 is one the SLA2 kernels support.
SCALED_DOWN: dict[str, dict[str, Any]] = {
    "WanTransformer3DModel": {
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256,
        "text_dim": 32, "freq_dim": 32,
    },
    "CogVideoXTransformer3DModel": {
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 64, "time_embed_dim": 32,
        "text_embed_dim": 32, "max_text_seq_length": 16, "sample_height": 16, "sample_width": 16,
        "sample_frames": 9,
    },
}
SCALED_IMAGE_DIM = 32
SCALED_TEXT_TOKENS = 16


def _require_architecture(recipe: Recipe) -> dict[str, Any]:
    config = recipe.model_config()
    if config is None:
        raise ValueError(f"recipe {recipe.name} has no architecture to build")
    return config


def scaled_down_config(recipe: Recipe | str) -> dict[str, Any]:
    """The recipe's architecture with small widths and two layers; same class, same code paths."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    config = _require_architecture(recipe)
    config.update(SCALED_DOWN[recipe.model_class])
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("image_dim") is not None:
        config["image_dim"] = SCALED_IMAGE_DIM
    if config.get("added_kv_proj_dim") is not None:
        config["added_kv_proj_dim"] = inner_dim
    return config


@contextmanager
def creation_defaults(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Modules built inside create their parameters and buffers directly in `dtype` on `device` (their own
    initialisers run there): a 14B model never passes through float32 on the CPU, nor through a copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _keep_fp32_modules_fp32(model: diffusers.ModelMixin) -> None:
    """Mirror diffusers' loading: modules listed in `_keep_in_fp32_modules` stay float32."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            parameter.data = parameter.data.float()


def build_random_model(
    recipe_name: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    full_size: bool = True,
    seed: int = 0,
    num_layers: int | None = None,
) -> diffusers.ModelMixin:
    """The recipe's transformer with random weights (full size, or scaled down), in eval mode, built on
    `device` in `dtype` (the modules diffusers keeps in float32 in float32); the same seed gives the same
    weights on the same device. num_layers: that many transformer blocks instead of the architecture's (a
    memory study of a model too large to train whole on one GPU measures shallower copies)."""
    recipe = get_recipe(recipe_name)
    config = _require_architecture(recipe) if full_size else scaled_down_config(recipe)
    if num_layers is not None:
        if "num_layers" not in config or num_layers < 1:
            raise ValueError(f"recipe {recipe.name}: num_layers must be >= 1 and the architecture must have one")
        config["num_layers"] = num_layers
    cls = model_class(recipe.model_class)
    torch.manual_seed(seed)
    with creation_defaults(dtype, device):
        model = cls.from_config(config)
    if dtype != torch.float32:
        _keep_fp32_modules_fp32(model)
    return model.eval().requires_grad_(False)


def _resolve_size(recipe: Recipe, resolution: str | tuple[int, int], frames: int | None) -> Resolution:
    if isinstance(resolution, str):
        named = recipe.resolution(resolution)
        return Resolution(named.height, named.width, frames or named.frames)
    height, width = resolution
    return Resolution(height, width, frames or recipe.resolution().frames)


def _cogvideox_rotary(config: dict[str, Any], grid: tuple[int, int, int], device: torch.device | str):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    frames, height, width = grid
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"],
        crops_coords=((0, 0), (height, width)),
        grid_size=(height, width),
        temporal_size=frames,
        device=device,
    )


def example_inputs(
    recipe: Recipe | str,
    resolution: str | tuple[int, int] = "480p",
    frames: int | None = 81,
    batch: int = 1,
    *,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one forward of the recipe's transformer: noisy latents, a timestep and
    text (and, for I2V, image) embeddings, shaped for `resolution` (a recipe resolution name, or
    (height, width) in pixels) and `frames`. `config` is the model's config when it is not the
    recipe's full-size architecture (e.g. `scaled_down_config`)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    config = dict(config) if config is not None else _require_architecture(recipe)
    size = _resolve_size(recipe, resolution, frames)
    latent_frames, latent_height, latent_width = recipe.video.latent_shape(size)
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.full((batch,), 500.0, device=device)
    if recipe.model_class == "CogVideoXTransformer3DModel":
        text_tokens = config["max_text_seq_length"]
        inputs = {
            "hidden_states": noise(batch, latent_frames, config["in_channels"], latent_height, latent_width),
            "encoder_hidden_states": noise(batch, text_tokens, config["text_embed_dim"]),
            "timestep": timestep,
        }
        if config.get("use_rotary_positional_embeddings"):
            patch = config["patch_size"]
            grid = (latent_frames, latent_height // patch, latent_width // patch)
            inputs["image_rotary_emb"] = _cogvideox_rotary(config, grid, device)
        return inputs
    text_tokens = recipe.video.text_tokens
    inputs = {
        "hidden_states": noise(batch, config["in_channels"], latent_frames, latent_height, latent_width),
        "timestep": timestep,
        "encoder_hidden_states": noise(batch, text_tokens, config["text_dim"]),
    }
    if config.get("image_dim") is not None:
        inputs[IMAGE_ARGUMENT] = noise(batch, IMAGE_TOKENS, config["image_dim"])
    return inputs
