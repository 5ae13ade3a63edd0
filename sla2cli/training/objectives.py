"""Training objectives of Wan-family video DiTs, and the held-out validation loss every trainer reports.

Rectified flow (Wan and the embedded model): x_t = (1 - t) x0 + t noise, the model gets timestep
t * 1000 and predicts the velocity noise - x0. Timesteps are drawn as u ~ U(0, 1) and shifted like
diffusers' FlowMatchEulerDiscreteScheduler shifts its sigmas, t = s u / (1 + (s - 1) u): s > 1 spends
more steps at high noise, where large clips need them (Wan uses 3 at 480p, 5 at 720p).

- `flow`: MSE between the predicted and the true velocity.
- `distill`: MSE between the prediction and a frozen teacher's (the dense model) on the same noisy input.

The validation loss is always the flow loss on fixed held-out clips, fixed noise and fixed times, so it
compares runs, objectives and attention variants with one yardstick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sla2cli.embedded.loading import noisy_latents
from sla2cli.embedded.synthetic import VALIDATION_SEED_BASE

OBJECTIVES = ("flow", "distill")
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
# Fine-tuning validates one clip per forward pass, so the figure is bit-for-bit the same whatever the batch
# size, the number of processes or the caller (the command, the Python API, a re-check of a saved model).
VALIDATION_CHUNK = 1
TIMESTEP_SCALE = 1000.0


@dataclass
class NoisyBatch:
    """A training batch: clean latents (B, C, F, H, W), text (B, S, D), extra conditioning, and the
    per-sample noise and time t in [0, 1] that make its noisy input."""

    clean: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.clean.shape[0]


def shift_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """t = s u / (1 + (s - 1) u): the identity for s = 1, pushed towards 1 (more noise) for s > 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def predict(
    model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The model's velocity prediction for noisy latents at times t (B,) in [0, 1]."""
    return model(
        hidden_states=noisy,
        timestep=t * TIMESTEP_SCALE,
        encoder_hidden_states=text,
        return_dict=False,
        **dict(extras or {}),
    )[0]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32: (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_loss(model: nn.Module, batch: NoisyBatch) -> torch.Tensor:
    """Per-sample rectified-flow velocity loss (B,)."""
    noisy = noisy_latents(batch.clean, batch.noise, batch.t).to(batch.clean.dtype)
    prediction = predict(model, noisy, batch.t, batch.text, batch.extras)
    return per_sample_mse(prediction, batch.noise - batch.clean)


def distill_loss(model: nn.Module, teacher: nn.Module, batch: NoisyBatch) -> torch.Tensor:
    """Per-sample MSE to the frozen teacher's prediction on the same noisy input (B,)."""
    noisy = noisy_latents(batch.clean, batch.noise, batch.t).to(batch.clean.dtype)
    with torch.no_grad():
        target = predict(teacher, noisy, batch.t, batch.text, batch.extras)
    prediction = predict(model, noisy, batch.t, batch.text, batch.extras)
    return per_sample_mse(prediction, target)


def flow_matching_loss(
    model: nn.Module, clean: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Rectified-flow velocity loss on one batch, t ~ U(0, 1) per clip, drawn from `generator`."""
    t = torch.rand(clean.shape[0], generator=generator, device=clean.device)
    noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    return flow_loss(model, NoisyBatch(clean=clean, text=text, noise=noise, t=t)).mean()


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    clean: torch.Tensor,
    text: torch.Tensor,
    use_autocast: bool,
    *,
    extras: Mapping[str, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> float:
    """Mean velocity loss over fixed noise and fixed times: comparable between runs and checkpoints.

    The noise comes from a generator seeded with VALIDATION_SEED_BASE (never a training seed), one
    draw of the whole set per time in VALIDATION_TIMES; `chunk_size` splits the set into forward
    passes of that many clips (the figure does not depend on it beyond float rounding).
    """
    generator = torch.Generator().manual_seed(VALIDATION_SEED_BASE)
    count = clean.shape[0]
    chunk = count if chunk_size is None else max(1, chunk_size)
    extras = dict(extras or {})
    losses = []
    for time_value in VALIDATION_TIMES:
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        squared, elements = 0.0, 0
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            t = torch.full((clean[part].shape[0],), time_value, device=clean.device)
            with torch.autocast(clean.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                prediction = predict(
                    model, noisy_latents(clean[part], noise[part], t), t, text[part],
                    {key: value[part] for key, value in extras.items()},
                )
            error = torch.nn.functional.mse_loss(prediction.float(), noise[part] - clean[part], reduction="sum")
            squared += error.item()
            elements += prediction.numel()
        losses.append(squared / elements)
    return sum(losses) / len(losses)
