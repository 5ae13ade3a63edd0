"""Stage 1 of training: calibrate each converted layer's router (W_q, W_k) and alpha predictor.

The base model is frozen, so each layer sees the same q, k, v whatever the other layers learn: the
layers are captured once (with full attention everywhere, i.e. the inputs the original model gives
them) and then trained one at a time against full attention on those tensors. Training uses soft
routing on a random subset of query blocks per step (the loss is separable over query rows, so memory
stays far below L x L); the result is judged on what inference runs: hard routing, all rows. The soft
objective can improve while the hard-routing error rises, so a layer keeps its trained parameters only
when its hard-routing error did not rise; otherwise its previous parameters are restored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sla2cli.module import SLA2Attention
from sla2cli.ops.geometry import k_selected, num_blocks
from sla2cli.ops.soft import DEFAULT_TAU, query_block_rows
from sla2cli.report.capture import AttentionForward, wrapped_forwards
from sla2cli.report.inputs import ForwardInput


@dataclass(frozen=True)
class CalibrationSettings:
    """How long and how hard to train each layer."""

    steps: int = 200
    learning_rate: float = 1e-4  # 1e-3 made every embedded layer worse under hard routing (measured)
    query_blocks: int = 8
    tau: float = DEFAULT_TAU
    seed: int = 0


@dataclass(frozen=True)
class CapturedCall:
    """One call of a layer: its q, k, v (B, H, L, D) and the full-attention output, the training target."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dense: torch.Tensor

    @property
    def length(self) -> int:
        return self.q.shape[2]


@dataclass(frozen=True)
class LayerResult:
    """Soft-routing loss on fixed query blocks and hard-routing relative L2 error, before and after training.

    `kept` says whether the layer keeps the trained parameters (its hard-routing error did not rise);
    the "after" figures are those of the trained parameters either way.
    """

    name: str
    soft_loss_before: float
    soft_loss_after: float
    rel_l2_before: float
    rel_l2_after: float
    trained: bool
    kept: bool

    @property
    def rel_l2_final(self) -> float:
        """Hard-routing error of the parameters the layer ends with."""
        return self.rel_l2_after if self.kept else self.rel_l2_before


@contextmanager
def capture_dense_calls(layers: dict[str, SLA2Attention]) -> Iterator[dict[str, list[CapturedCall]]]:
    """While inside, converted layers run full attention and record every call's q, k, v and output."""
    calls: dict[str, list[CapturedCall]] = {name: [] for name in layers}

    def make_forward(name: str, layer: SLA2Attention, original: AttentionForward) -> AttentionForward:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dense = F.scaled_dot_product_attention(q, k, v)
            q, k, v = (t.detach().contiguous() for t in (q, k, v))
            calls[name].append(CapturedCall(q, k, v, dense.detach().contiguous()))
            return dense

        return forward

    with wrapped_forwards(layers, make_forward):
        yield calls


@torch.no_grad()
def collect_calls(
    models: list[torch.nn.Module],
    layers: dict[str, SLA2Attention],
    forwards: list[ForwardInput],
    on_forward: Callable[[], None] | None = None,
) -> dict[str, list[CapturedCall]]:
    """Run every input through every model (full attention) and keep each layer's calls."""
    with capture_dense_calls(layers) as calls:
        for model in models:
            for item in forwards:
                model(**item.kwargs, return_dict=False)
                if on_forward is not None:
                    on_forward()
    return calls


def has_router_to_train(layer: SLA2Attention, length: int) -> bool:
    """False when the layer keeps every key block at this length: then the output ignores the router."""
    key_blocks = num_blocks(length, layer.block_k)
    return k_selected(key_blocks, layer.sparsity) < key_blocks


def random_query_blocks(length: int, block_q: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct query-block indices (all of them when there are fewer), drawn on the CPU."""
    total = num_blocks(length, block_q)
    return torch.randperm(total, generator=generator)[: min(count, total)]


def soft_loss(layer: SLA2Attention, call: CapturedCall, query_blocks: torch.Tensor, tau: float) -> torch.Tensor:
    """MSE between the soft-routing SLA2 rows of `query_blocks` and full attention on the same rows."""
    blocks = query_blocks.to(call.q.device)
    predicted = layer.soft_forward(call.q, call.k, call.v, query_blocks=blocks, tau=tau)
    rows = query_block_rows(call.length, layer.block_q, blocks)
    return F.mse_loss(predicted.float(), call.dense[:, :, rows].float())


@torch.no_grad()
def mean_soft_loss(
    layer: SLA2Attention, calls: list[CapturedCall], blocks: list[torch.Tensor], tau: float
) -> float:
    """Soft loss averaged over the calls, each on its own fixed query blocks."""
    return sum(soft_loss(layer, call, b, tau).item() for call, b in zip(calls, blocks, strict=True)) / len(calls)


@torch.no_grad()
def mean_hard_error(layer: SLA2Attention, calls: list[CapturedCall]) -> float:
    """||SLA2(q, k, v) - dense|| / ||dense|| with hard routing on every row, averaged over the calls."""
    errors = []
    for call in calls:
        out = layer(call.q, call.k, call.v).float()
        dense = call.dense.float()
        errors.append(((out - dense).norm() / dense.norm().clamp_min(1e-12)).item())
    return sum(errors) / len(errors)


def train_layer(
    layer: SLA2Attention,
    calls: list[CapturedCall],
    settings: CalibrationSettings,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Adam on the layer's own parameters only; each step one random call and random query blocks."""
    parameters = list(layer.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    try:
        for _ in range(settings.steps):
            call = calls[int(torch.randint(len(calls), (1,), generator=generator))]
            blocks = random_query_blocks(call.length, layer.block_q, settings.query_blocks, generator)
            loss = soft_loss(layer, call, blocks, settings.tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
            parameter.grad = None


def calibrate_layer(
    name: str,
    layer: SLA2Attention,
    calls: list[CapturedCall],
    settings: CalibrationSettings,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
) -> LayerResult:
    """Measure, train, measure again; restore the previous parameters if the hard-routing error rose.

    Layers whose router cannot matter (every key block kept) are measured but not trained.
    """
    evaluation_blocks = [
        random_query_blocks(call.length, layer.block_q, settings.query_blocks, generator) for call in calls
    ]
    loss_before = mean_soft_loss(layer, calls, evaluation_blocks, settings.tau)
    error_before = mean_hard_error(layer, calls)
    trainable = all(has_router_to_train(layer, call.length) for call in calls)
    previous = {key: value.detach().clone() for key, value in layer.state_dict().items()}
    if trainable:
        train_layer(layer, calls, settings, generator, on_step)
    elif on_step is not None:
        for _ in range(settings.steps):
            on_step()
    loss_after = mean_soft_loss(layer, calls, evaluation_blocks, settings.tau)
    error_after = mean_hard_error(layer, calls)
    kept = trainable and error_after <= error_before
    if not kept:
        layer.load_state_dict(previous)
    return LayerResult(
        name=name,
        soft_loss_before=loss_before,
        soft_loss_after=loss_after,
        rel_l2_before=error_before,
        rel_l2_after=error_after,
        trained=trainable,
        kept=kept,
    )


def calibrate_layers(
    layers: dict[str, SLA2Attention],
    calls: dict[str, list[CapturedCall]],
    settings: CalibrationSettings,
    on_step: Callable[[], None] | None = None,
) -> list[LayerResult]:
    """Calibrate every layer that was called, one after the other (each is independent of the others)."""
    generator = torch.Generator().manual_seed(settings.seed)
    return [
        calibrate_layer(name, layer, calls[name], settings, generator, on_step)
        for name, layer in layers.items()
        if calls.get(name)
    ]


def summary_measurements(results: list[LayerResult], settings: CalibrationSettings) -> dict[str, float | int]:
    """Flat figures for the checkpoint's model card: layer means of the soft loss and of the hard error of
    the parameters each layer ends with, and how many layers kept their trained parameters."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {
        "calibration_steps_per_layer": settings.steps,
        "calibration_soft_loss_before": float(f"{mean([r.soft_loss_before for r in results]):.4g}"),
        "calibration_soft_loss_after": float(f"{mean([r.soft_loss_after for r in results]):.4g}"),
        "calibration_rel_l2_before": round(mean([r.rel_l2_before for r in results]), 5),
        "calibration_rel_l2_after": round(mean([r.rel_l2_final for r in results]), 5),
        "calibration_layers_kept": sum(r.kept for r in results),
    }
