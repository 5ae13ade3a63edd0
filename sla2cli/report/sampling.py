"""Side-by-side samples for `--video`: the dense model and the SLA2 model from the same noise.

A few Euler steps of the flow-matching ODE dx/dt = v(x, t), t from 1 (noise) to 0, with the velocity
the model predicts (noise - x0, as the embedded model is trained). Both runs use the same weights and
the same noise; the dense run only swaps each converted layer's attention for full softmax attention.
"""

from __future__ import annotations

import torch
from torch import nn

from sla2cli.integration.conversion import sla2_layers
from sla2cli.module import SLA2Attention
from sla2cli.report.capture import dense_attention, overridden_sparsity
from sla2cli.report.inputs import (
    CleanSample,
    FamilyInputs,
    embedded_samples,
    family_inputs,
    latent_grid_for,
    parse_resolution,
)
from sla2cli.report.runner import ReportSettings, ReportTarget


@torch.no_grad()
def euler_flow_sample(
    model: nn.Module, adapter: FamilyInputs, sample: CleanSample, noise: torch.Tensor, steps: int
) -> torch.Tensor:
    """x at t = 0 after `steps` Euler steps from x = noise at t = 1."""
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        velocity = model(**adapter.forward_kwargs(sample, x, t), return_dict=False)[0]
        x = x + (t_next - t) * velocity.to(x.dtype)
    return x


def dense_and_sla2_samples(
    model: nn.Module,
    layers: dict[str, SLA2Attention],
    adapter: FamilyInputs,
    sample: CleanSample,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense sample, SLA2 sample), each (C, F, H, W) float32 on the CPU, from one fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(sample.latents.shape, generator=generator).to(device=device, dtype=dtype)
    conditioned = CleanSample(
        sample.label,
        sample.latents,
        sample.text.to(device=device, dtype=dtype),
        {key: value.to(device=device, dtype=dtype) for key, value in sample.extras.items()},
    )
    with dense_attention(layers):
        dense = euler_flow_sample(model, adapter, conditioned, noise, steps)
    sparse = euler_flow_sample(model, adapter, conditioned, noise, steps)
    return dense[0].float().cpu(), sparse[0].float().cpu()


def comparison_samples(
    target: ReportTarget, settings: ReportSettings, *, steps: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense and SLA2 samples of the embedded model's first validation clip's prompt, at the report's
    resolution, sparsity and seed."""
    adapter = family_inputs(target.main, target.recipe)
    grid = latent_grid_for(parse_resolution(settings.resolution, target.recipe), target.recipe, adapter)
    sample = embedded_samples(adapter, grid, 1)[0]
    layers = sla2_layers(target.main)
    with overridden_sparsity(layers, settings.sparsity):
        return dense_and_sla2_samples(
            target.main, layers, adapter, sample, steps=steps, seed=settings.seed, device=device, dtype=dtype
        )


def sla2_label(target: ReportTarget, settings: ReportSettings) -> str:
    """'SLA2, sparsity 0.97': what the SLA2 half of the comparison ran at (the override, else the layers' own)."""
    if settings.sparsity is not None:
        levels = [settings.sparsity]
    else:
        levels = sorted({layer.sparsity for layer in sla2_layers(target.main).values()})
    return "SLA2, sparsity " + "/".join(f"{level:g}" for level in levels)
