"""Build the embedded model, load its shipped weights (safetensors, no network), make example inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from sla2cli.embedded.config import (
    ASSETS_DIR,
    CONFIG_FILENAME,
    DEFAULT_CLIP,
    WEIGHTS_FILENAME,
    default_config,
    model_kwargs_from_config,
    read_config,
)
from sla2cli.embedded.synthetic import TEXT_DIM, TEXT_TOKENS, make_batch
from sla2cli.errors import UserError
from sla2cli.ops.validation import check_timestep


def build_embedded_model(config: dict[str, Any] | None = None) -> WanTransformer3DModel:
    """A freshly initialised model of the embedded architecture (float32, CPU)."""
    return WanTransformer3DModel(**model_kwargs_from_config(config or default_config()))


def keep_precision_sensitive_parts_fp32(model: WanTransformer3DModel) -> None:
    """Return RoPE tables, time embedding, modulation tables and norms to float32 after a cast.

    diffusers does the same when it loads Wan in half precision; without it the RoPE angles of
    long clips lose accuracy in bfloat16.
    """
    patterns = tuple(model._keep_in_fp32_modules or ())
    for name, parameter in model.named_parameters():
        if any(pattern in name for pattern in patterns):
            parameter.data = parameter.data.float()
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            full_name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if buffer.is_floating_point() and any(pattern in full_name for pattern in patterns):
                setattr(module, buffer_name, buffer.float())


def load_embedded_model(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    assets_dir: Path | str | None = None,
) -> WanTransformer3DModel:
    """The trained embedded model in eval mode, from `<assets>/embedded_wan.{json,safetensors}`."""
    directory = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    config_path = directory / CONFIG_FILENAME
    weights_path = directory / WEIGHTS_FILENAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"embedded model file {path.name} is missing in {directory}; reinstall sla2")
    model = build_embedded_model(read_config(config_path))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model = model.to(device=device)
    if dtype != torch.float32:  # a float32 cast would only make diffusers warn about fp32 modules
        model = model.to(dtype=dtype)
        keep_precision_sensitive_parts_fp32(model)
    return model.eval().requires_grad_(False)


def noisy_latents(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_t = (1 - t) x0 + t noise, with t per batch element."""
    t = t.view(-1, *([1] * (clean.dim() - 1)))
    return (1.0 - t) * clean + t * noise


def embedded_example_inputs(
    batch: int = 1,
    frames: int = DEFAULT_CLIP["frames"],
    height: int = DEFAULT_CLIP["height"],
    width: int = DEFAULT_CLIP["width"],
    seed: int = 0,
    timestep: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for the embedded model: synthetic clips noised to `timestep` in [0, 1].

    Clip i uses scene seed `seed + i`; the noise comes from `seed` too, so inputs are reproducible.
    """
    check_timestep(timestep)
    clean, text = make_batch(range(seed, seed + batch), frames, height, width, TEXT_DIM, TEXT_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.full((batch,), float(timestep))
    return {
        "hidden_states": noisy_latents(clean, noise, t).to(device=device, dtype=dtype),
        "timestep": (t * 1000.0).to(device=device),
        "encoder_hidden_states": text.to(device=device, dtype=dtype),
    }
