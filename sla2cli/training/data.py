"""Where fine-tuning samples come from, and how a list of global sample indices becomes a noisy batch.

- `ProceduralClips`: the embedded model's procedural videos at any clip size; sample i is the scene
  drawn from derived_seed(seed, i), always below VALIDATION_SEED_BASE, so never a validation clip.
- `LatentData`: a folder of precomputed latents (`latent_format`); epoch e visits the training samples
  in the permutation drawn from (seed, e), so sample i is fixed by i alone.

Either way a sample depends on its global index only: see `seeding`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sla2cli.embedded.synthetic import (
    LATENT_CHANNELS,
    TEXT_DIM,
    TEXT_TOKENS,
    VALIDATION_SEED_BASE,
    make_clip,
    validation_clips,
)
from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import IMAGE_ARGUMENT
from sla2cli.training.latent_format import (
    IMAGE_EMBEDS,
    LATENTS,
    PROMPT_EMBEDS,
    LatentFolder,
    SampleRef,
    open_latent_folder,
)
from sla2cli.training.objectives import NoisyBatch, shift_timesteps
from sla2cli.training.seeding import STREAM_CLIP, STREAM_NOISE, STREAM_ORDER, derived_seed, generator_for
from sla2cli.training.settings import Clip


@dataclass(frozen=True)
class Sample:
    """One clean clip: latents (C, F, H, W), text embeddings (S, D), further conditioning by keyword."""

    latents: torch.Tensor
    text: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationSet:
    """The held-out clips, stacked: latents (N, C, F, H, W), text (N, S, D), extras (N, ...)."""

    clean: torch.Tensor
    text: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def stack_samples(samples: list[Sample], device: torch.device) -> ValidationSet:
    """Stack samples of one shape into batch tensors on `device`."""
    extras = {key: torch.stack([s.extras[key] for s in samples]).to(device) for key in samples[0].extras}
    return ValidationSet(
        clean=torch.stack([s.latents for s in samples]).to(device),
        text=torch.stack([s.text for s in samples]).to(device),
        extras=extras,
    )


class TrainingData(ABC):
    """A source of training samples by global index, and of a fixed validation set."""

    origin: str  # names the data in error messages

    @abstractmethod
    def sample(self, index: int, device: torch.device) -> Sample:
        """Training sample number `index` (0, 1, 2, ... over the whole run)."""

    @abstractmethod
    def validation_set(self, device: torch.device) -> ValidationSet:
        """The held-out samples, never drawn for training."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the model card."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """What identifies the data, so that a resumed run can check it trains on the same."""

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one sample's tensors: latents, prompt_embeds[, image_embeds]."""


class ProceduralClips(TrainingData):
    """The embedded model's procedural clips (4 latent channels, 8 text tokens of width 32)."""

    def __init__(self, clip: Clip, seed: int, validation_samples: int) -> None:
        self.clip = tuple(clip)
        self.seed = seed
        self.validation_samples = validation_samples
        self.origin = "the procedural clips of the embedded model"

    def sample(self, index: int, device: torch.device) -> Sample:
        scene = derived_seed(self.seed, STREAM_CLIP, index) % VALIDATION_SEED_BASE
        clip = make_clip(scene, *self.clip, TEXT_DIM, TEXT_TOKENS, device)
        return Sample(clip.latents, clip.text_embedding)

    def validation_set(self, device: torch.device) -> ValidationSet:
        clips = validation_clips(self.validation_samples, self.clip, TEXT_DIM, TEXT_TOKENS)
        return stack_samples([Sample(c.latents, c.text_embedding) for c in clips], device)

    def describe(self) -> str:
        frames, height, width = self.clip
        return f"procedural clips, {frames}x{height}x{width} latents"

    def fingerprint(self) -> dict:
        return {"kind": "procedural", "clip": list(self.clip), "validation_samples": self.validation_samples}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {LATENTS: (LATENT_CHANNELS, *self.clip), PROMPT_EMBEDS: (TEXT_TOKENS, TEXT_DIM)}


class LatentData(TrainingData):
    """Samples of a latent data folder, in a fresh permutation per epoch."""

    def __init__(self, folder: LatentFolder, seed: int) -> None:
        self.folder = folder
        self.seed = seed
        self.origin = str(folder.training[0].path)
        self._orders: dict[int, list[int]] = {}

    def _ref(self, index: int) -> SampleRef:
        epoch, position = divmod(index, len(self.folder.training))
        if epoch not in self._orders:
            generator = generator_for(self.seed, STREAM_ORDER, epoch)
            self._orders = {epoch: torch.randperm(len(self.folder.training), generator=generator).tolist()}
        return self.folder.training[self._orders[epoch][position]]

    def _load(self, ref: SampleRef) -> Sample:
        tensors = self.folder.read(ref)
        extras = {IMAGE_ARGUMENT: tensors[IMAGE_EMBEDS]} if IMAGE_EMBEDS in tensors else {}
        return Sample(tensors[LATENTS], tensors[PROMPT_EMBEDS], extras)

    def sample(self, index: int, device: torch.device) -> Sample:
        sample = self._load(self._ref(index))
        return Sample(sample.latents.to(device), sample.text.to(device),
                      {key: value.to(device) for key, value in sample.extras.items()})

    def validation_set(self, device: torch.device) -> ValidationSet:
        return stack_samples([self._load(ref) for ref in self.folder.validation], device)

    def describe(self) -> str:
        return (f"{len(self.folder.training)} precomputed clips of {self.folder.root.name} "
                f"({len(self.folder.validation)} held out)")

    def fingerprint(self) -> dict:
        return {"kind": "latents", "digest": self.folder.digest}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.folder.shapes)


def _patch(model: nn.Module) -> tuple[int, int, int]:
    patch = model.config.patch_size
    return tuple(patch) if isinstance(patch, (list, tuple)) else (1, patch, patch)


def attention_shape(data: TrainingData, model: nn.Module, batch: int) -> tuple[int, int, int, int]:
    """(B, H, L, D) of the model's self-attention calls on this data's clips: L is the latent grid over the patch."""
    layer = next(iter(sla2_layers(model).values()))
    _, *grid = data.shapes()[LATENTS]
    length = math.prod(size // step for size, step in zip(grid, _patch(model), strict=True))
    return batch, layer.num_heads, length, layer.head_dim


def check_fits(data: TrainingData, model: nn.Module) -> None:
    """The samples' shapes against what the transformer takes; a mismatch names the data's file."""
    config = model.config
    shapes = data.shapes()
    channels, *grid = shapes[LATENTS]
    if channels != config.in_channels:
        raise UserError(f"{data.origin}: latents have {channels} channels, the model takes {config.in_channels}")
    if any(size % step for size, step in zip(grid, _patch(model), strict=True)):
        raise UserError(f"{data.origin}: latent size {'x'.join(map(str, grid))} (frames x height x width) is not "
                        f"a multiple of the model's patch {'x'.join(map(str, _patch(model)))}")
    text_dim = getattr(config, "text_dim", None)
    if shapes[PROMPT_EMBEDS][1] != text_dim:
        raise UserError(f"{data.origin}: prompt embeddings have width {shapes[PROMPT_EMBEDS][1]}, the model's "
                        f"text encoder width is {text_dim}")
    image_dim = getattr(config, "image_dim", None)
    if image_dim and (IMAGE_EMBEDS not in shapes or shapes[IMAGE_EMBEDS][1] != image_dim):
        raise UserError(f"{data.origin}: this image-to-video model needs image_embeds of width {image_dim} "
                        "per sample")
    if not image_dim and IMAGE_EMBEDS in shapes:
        raise UserError(f"{data.origin}: samples hold image_embeds but the model takes no image conditioning")


def training_batch(
    data: TrainingData, indices: list[int], *, seed: int, shift: float, device: torch.device
) -> NoisyBatch:
    """Samples `indices` stacked, each with its own noise and shifted time drawn from (seed, index)."""
    samples = [data.sample(index, device) for index in indices]
    stacked = stack_samples(samples, device)
    noises, times = [], []
    for index, sample in zip(indices, samples, strict=True):
        generator = generator_for(seed, STREAM_NOISE, index, device=device)
        times.append(torch.rand((1,), generator=generator, device=device))
        noises.append(torch.randn(sample.latents.shape, generator=generator, device=device))
    t = shift_timesteps(torch.cat(times), shift)
    return NoisyBatch(clean=stacked.clean, text=stacked.text, noise=torch.stack(noises), t=t, extras=stacked.extras)


def data_from_folder(path: Path, seed: int, validation_samples: int) -> LatentData:
    """A latent data folder, checked (manifest, headers, shapes) before any training."""
    return LatentData(open_latent_folder(Path(path), holdout=validation_samples), seed)
