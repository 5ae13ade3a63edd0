"""Sample inputs for the report: clean latents and text embeddings, noised to each requested timestep.

Three sources, in order of how much they say about a real model:
- the embedded model's own held-out validation clips;
- a user file (`--inputs`, safetensors) with real latents and text embeddings;
- random latents and embeddings, which understate the structure of attention (the report warns).

Each family knows its latent layout and how its transformer wants to be called: Wan takes
(B, C, F, H, W) latents on a rectified-flow schedule; CogVideoX takes (B, F, C, H, W) latents on a
DDPM schedule and needs rotary tables computed from the clip size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sla2cli.embedded.synthetic import calibration_clips, validation_clips
from sla2cli.errors import UserError
from sla2cli.integration.recipes import IMAGE_ARGUMENT, IMAGE_TOKENS, Recipe, Resolution

LATENTS_KEY = "latents"
TEXT_KEY = "encoder_hidden_states"
COGVIDEOX_OFS = 2.0  # the offset embedding value CogVideoX 1.5 image-to-video pipelines pass
RANDOM_INPUTS_WARNING = (
    "no --inputs given: using random latents and text embeddings; random inputs understate the "
    "structure of real attention, so expect lower captured mass and larger errors than on real data"
)


@dataclass(frozen=True)
class CleanSample:
    """One clean clip before noising: latents in the model's layout, text embeddings, optional extras."""

    label: str
    latents: torch.Tensor
    text: torch.Tensor
    extras: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ForwardInput:
    """One transformer forward pass: what it shows (clip and timestep) and its keyword arguments."""

    label: str
    timestep: float
    kwargs: dict[str, torch.Tensor | tuple[torch.Tensor, ...]]


class FamilyInputs(ABC):
    """How one model family lays out latents and is called; subclasses fill in the differences."""

    channels_axis = 1

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        self.config = model.config
        self.recipe = recipe

    @property
    def channels(self) -> int:
        return int(self.config.in_channels)

    @property
    @abstractmethod
    def text_dim(self) -> int:
        """Width of one text-embedding token."""

    @property
    def text_tokens(self) -> int:
        return self.recipe.video.text_tokens

    @abstractmethod
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of one clip's latents (batch 1) in the model's layout."""

    @abstractmethod
    def latent_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) of latents in the model's layout."""

    @abstractmethod
    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """The clean latents noised to level t in [0, 1] on the family's training schedule."""

    @abstractmethod
    def forward_kwargs(self, sample: CleanSample, noisy: torch.Tensor, t: float) -> dict:
        """Keyword arguments of the transformer's forward for noisy latents at level t."""

    def random_extras(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Further conditioning tensors the family needs, drawn at random (none by default)."""
        return {}

    def check_grid(self, frames: int, height: int, width: int, origin: str) -> None:
        """The transformer cuts latents into patches: each side must be a multiple of its patch."""
        patch_t, patch_h, patch_w = self.recipe.video.patch
        if frames % patch_t or height % patch_h or width % patch_w or min(frames, height, width) < 1:
            raise UserError(
                f"{origin}: latent size {frames}x{height}x{width} (frames x height x width) must be positive "
                f"multiples of the patch {patch_t}x{patch_h}x{patch_w}"
            )


class WanInputs(FamilyInputs):
    """Wan2.1/2.2 (and the embedded model): (B, C, F, H, W), x_t = (1 - t) x0 + t noise, timestep t * 1000."""

    @property
    def text_dim(self) -> int:
        return int(self.config.text_dim)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        return (1, self.channels, frames, height, width)

    def latent_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        return tuple(latents.shape[2:5])

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        return (1.0 - t) * clean + t * noise

    def forward_kwargs(self, sample: CleanSample, noisy: torch.Tensor, t: float) -> dict:
        kwargs = {
            "hidden_states": noisy,
            "timestep": torch.full((noisy.shape[0],), t * 1000.0, device=noisy.device),
            "encoder_hidden_states": sample.text,
        }
        if IMAGE_ARGUMENT in sample.extras:
            kwargs[IMAGE_ARGUMENT] = sample.extras[IMAGE_ARGUMENT]
        return kwargs

    def random_extras(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        image_dim = getattr(self.config, "image_dim", None)
        if not image_dim:
            return {}
        return {IMAGE_ARGUMENT: torch.randn(1, IMAGE_TOKENS, int(image_dim), generator=generator)}


class CogVideoXInputs(FamilyInputs):
    """CogVideoX: (B, F, C, H, W), DDPM noising (v-prediction schedule), rotary tables from the clip size."""

    channels_axis = 2

    @property
    def text_dim(self) -> int:
        return int(self.config.text_embed_dim)

    @property
    def text_tokens(self) -> int:
        return int(self.config.max_text_seq_length)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        return (1, frames, self.channels, height, width)

    def latent_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        return (latents.shape[1], latents.shape[3], latents.shape[4])

    def _alphas_cumprod(self) -> torch.Tensor:
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler().alphas_cumprod

    def _step(self, t: float) -> int:
        return min(999, max(0, round(t * 999)))

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        alpha_bar = self._alphas_cumprod()[self._step(t)].item()
        return alpha_bar**0.5 * clean + (1.0 - alpha_bar) ** 0.5 * noise

    def _rotary(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """3D RoPE tables for the clip's token grid, positioned as CogVideoX's pipelines position them.

        Version 1.0 (no temporal patch) scales the grid to fit its training grid and centres it;
        version 1.5 slices the table of its largest grid.
        """
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        frames, height, width = self.latent_grid(latents)
        patch, patch_t = int(self.config.patch_size), self.config.patch_size_t
        grid = (height // patch, width // patch)
        base = (int(self.config.sample_height) // patch, int(self.config.sample_width) // patch)
        head_dim = int(self.config.attention_head_dim)
        if patch_t is None:
            return get_3d_rotary_pos_embed(
                embed_dim=head_dim, crops_coords=fitted_region(grid, base), grid_size=grid,
                temporal_size=frames, device=latents.device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=None, grid_size=grid, temporal_size=-(-frames // int(patch_t)),
            grid_type="slice", max_size=base, device=latents.device,
        )

    def forward_kwargs(self, sample: CleanSample, noisy: torch.Tensor, t: float) -> dict:
        batch = noisy.shape[0]
        kwargs = {
            "hidden_states": noisy,
            "encoder_hidden_states": sample.text,
            "timestep": torch.full((batch,), self._step(t), dtype=torch.long, device=noisy.device),
        }
        if getattr(self.config, "use_rotary_positional_embeddings", False):
            kwargs["image_rotary_emb"] = self._rotary(noisy)
        if getattr(self.config, "ofs_embed_dim", None):
            kwargs["ofs"] = torch.full((batch,), COGVIDEOX_OFS, device=noisy.device)
        return kwargs


def fitted_region(grid: tuple[int, int], base: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Corners (top, left), (bottom, right) of `grid` scaled to fit inside `base` and centred in it."""
    grid_height, grid_width = grid
    base_height, base_width = base
    if grid_height / grid_width > base_height / base_width:
        height, width = base_height, round(base_height * grid_width / grid_height)
    else:
        height, width = round(base_width * grid_height / grid_width), base_width
    top, left = round((base_height - height) / 2), round((base_width - width) / 2)
    return (top, left), (top + height, left + width)


FAMILIES: dict[str, type[FamilyInputs]] = {"wan": WanInputs, "cogvideox": CogVideoXInputs}


def family_inputs(model: nn.Module, recipe: Recipe) -> FamilyInputs:
    """The input adapter for the recipe's family."""
    family = FAMILIES.get(recipe.attention.processor)
    if family is None:
        raise UserError(f"sla2 report does not know how to feed {recipe.model_class} models yet")
    return family(model, recipe)


def parse_resolution(text: str | None, recipe: Recipe) -> Resolution:
    """A recipe resolution name (e.g. 480p) or FRAMESxHEIGHTxWIDTH (e.g. 81x480x832); None is the default."""
    if text is None:
        return recipe.resolution()
    if text in recipe.resolutions:
        return recipe.resolutions[text]
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        names = ", ".join(recipe.resolutions)
        raise UserError(
            f"--resolution must be FRAMESxHEIGHTxWIDTH (e.g. 81x480x832) or one of: {names}; got {text!r}"
        )
    frames, height, width = (int(part) for part in parts)
    return Resolution(height=height, width=width, frames=frames)


def latent_grid_for(resolution: Resolution, recipe: Recipe, adapter: FamilyInputs) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a clip, checked against the patch size."""
    frames, height, width = recipe.video.latent_shape(resolution)
    adapter.check_grid(frames, height, width, f"--resolution {resolution.frames}x{resolution.height}x"
                       f"{resolution.width}")
    return frames, height, width


def random_samples(
    adapter: FamilyInputs, grid: tuple[int, int, int], count: int, seed: int
) -> list[CleanSample]:
    """`count` clips of standard-normal latents and text embeddings (plus any extras the family needs)."""
    samples = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        latents = torch.randn(adapter.latent_shape(*grid), generator=generator)
        text = torch.randn(1, adapter.text_tokens, adapter.text_dim, generator=generator)
        samples.append(CleanSample(f"random {index}", latents, text, adapter.random_extras(generator)))
    return samples


def _check_tensor(name: str, tensor: torch.Tensor, rank: int, origin: str) -> None:
    if tensor.dim() != rank or not tensor.is_floating_point():
        raise UserError(
            f"{origin}: tensor {name!r} must be a floating-point tensor of rank {rank}, "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )


def file_samples(path: Path, adapter: FamilyInputs, count: int | None) -> list[CleanSample]:
    """The first `count` clips (all when None) of a safetensors file with `latents` (model layout, batch
    first) and `encoder_hidden_states`.

    Shapes are checked against the model: channels, text width, patch multiples, equal batch sizes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    origin = f"--inputs {path.name}"
    if not path.is_file():
        raise UserError(
            f"{origin}: no such file; give a .safetensors file with '{LATENTS_KEY}' and '{TEXT_KEY}'"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{origin}: not a readable safetensors file ({error})") from None
    missing = [key for key in (LATENTS_KEY, TEXT_KEY) if key not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise UserError(f"{origin}: missing tensor(s) {', '.join(missing)}; found {found}")
    latents, text = tensors[LATENTS_KEY], tensors[TEXT_KEY]
    _check_tensor(LATENTS_KEY, latents, 5, origin)
    _check_tensor(TEXT_KEY, text, 3, origin)
    expected = adapter.latent_shape(*adapter.latent_grid(latents))
    if latents.shape[adapter.channels_axis] != adapter.channels:
        raise UserError(
            f"{origin}: '{LATENTS_KEY}' has shape {tuple(latents.shape)}, expected {adapter.channels} "
            f"channels on axis {adapter.channels_axis} (layout like {tuple(expected)})"
        )
    adapter.check_grid(*adapter.latent_grid(latents), origin)
    if text.shape[-1] != adapter.text_dim:
        raise UserError(
            f"{origin}: '{TEXT_KEY}' has width {text.shape[-1]}, the model expects {adapter.text_dim}"
        )
    if text.shape[0] != latents.shape[0]:
        raise UserError(
            f"{origin}: '{LATENTS_KEY}' holds {latents.shape[0]} clips but '{TEXT_KEY}' holds {text.shape[0]}"
        )
    extras: dict[str, torch.Tensor] = {}
    for key, reference in adapter.random_extras(torch.Generator().manual_seed(0)).items():
        if key not in tensors:
            shape = tuple(reference.shape)
            raise UserError(f"{origin}: this model also needs tensor {key!r} shaped like {shape}")
        if tensors[key].shape[1:] != reference.shape[1:] or tensors[key].shape[0] != latents.shape[0]:
            raise UserError(
                f"{origin}: '{key}' has shape {tuple(tensors[key].shape)}, "
                f"expected (B,) + {tuple(reference.shape[1:])}"
            )
        extras[key] = tensors[key]
    clips = latents.shape[0] if count is None else min(count, latents.shape[0])
    return [
        CleanSample(
            f"input {index}",
            latents[index : index + 1].float(),
            text[index : index + 1].float(),
            {key: value[index : index + 1].float() for key, value in extras.items()},
        )
        for index in range(clips)
    ]


def embedded_samples(
    adapter: FamilyInputs, grid: tuple[int, int, int], count: int, *, calibration: bool = False
) -> list[CleanSample]:
    """The embedded model's held-out validation clips at the latent size `grid` (calibration: its
    calibration clips instead, so that what calibrate fits on is not what report measures)."""
    make = calibration_clips if calibration else validation_clips
    label = "calibration clip" if calibration else "clip"
    clips = make(count, grid, adapter.text_dim, adapter.text_tokens)
    return [CleanSample(f"{label} {index}", clip.latents[None], clip.text_embedding[None], {})
            for index, clip in enumerate(clips)]


def forward_inputs(
    adapter: FamilyInputs,
    samples: list[CleanSample],
    timesteps: tuple[float, ...],
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[ForwardInput]:
    """Every (clip, timestep) pair as forward arguments; each clip has one fixed noise for all timesteps."""
    inputs = []
    for index, sample in enumerate(samples):
        generator = torch.Generator().manual_seed(seed + 7919 * (index + 1))
        noise = torch.randn(sample.latents.shape, generator=generator)
        moved = CleanSample(
            sample.label,
            sample.latents,
            sample.text.to(device=device, dtype=dtype),
            {key: value.to(device=device, dtype=dtype) for key, value in sample.extras.items()},
        )
        for t in timesteps:
            noisy = adapter.noised(sample.latents, noise, t).to(device=device, dtype=dtype)
            kwargs = adapter.forward_kwargs(moved, noisy, t)
            inputs.append(ForwardInput(f"{sample.label}, t={t:g}", t, kwargs))
    return inputs
