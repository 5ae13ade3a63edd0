"""Stage 1 of training: calibrate each converted layer's router (W_q, W_k) and alpha predictor.

The base model is frozen, so each layer sees the same q, k, v whatever the other layers learn: the
layers are captured once (with full attention everywhere, i.e. the inputs the original model gives
them) and then calibrated one at a time against full attention on those tensors, for what inference
runs: hard top-k routing on every row.

Two fits per layer, each against a target that the captured tensors give exactly:

1. router (`router_fit`): W_q, W_k so that the hard top-k blocks hold as much of the true softmax mass
   as possible (soft top-k relaxation with the budget kept in the gradient);
2. alpha (`alpha_fit`): the per-head alpha predictor for the router's hard routing, against the
   hard-routing error itself, which is quadratic in alpha per query block.

Measured on the embedded model at 0.97 (README, calibrate), these replace the soft-routing MSE
(0.608 -> 0.604 there). Guard: the layer ends with whichever of (its parameters before, alpha refitted
with the router it had, trained router with alpha refitted) gives the lowest hard-routing error, so
calibration never makes a layer worse on the captured calls, and a trained router is kept only when it
beats the router the layer had, each with its best alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sla2cli.errors import UserError
from sla2cli.integration.recipes import Recipe
from sla2cli.module import SLA2Attention
from sla2cli.ops.geometry import k_selected, num_blocks
from sla2cli.ops.validation import check_positive_number
from sla2cli.report.capture import AttentionForward, wrapped_forwards
from sla2cli.report.inputs import ForwardInput
from sla2cli.report.metrics import DEFAULT_CHUNK_ELEMENTS, relative_l2_error
from sla2cli.training.alpha_fit import fit_alpha, mix_coefficients
from sla2cli.training.router_fit import hard_captured_mass, router_target, train_router

UNCHANGED = "no"
ALPHA_ONLY = "alpha"
ROUTER_AND_ALPHA = "router+alpha"


@dataclass(frozen=True)
class CalibrationSettings:
    """How each layer is fitted; `from_recipe` gives a model family's measured defaults."""

    router_steps: int
    router_learning_rate: float
    alpha_steps: int
    alpha_learning_rate: float
    tau: float
    train_router: bool = True  # False: alpha only, router as it is (the heuristic one right after convert)
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS  # (query, key) pairs per step of the block-mass scan

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides: object) -> CalibrationSettings:
        """The recipe's `calibration` block, with any non-None override (e.g. from the command line)."""
        defaults = recipe.calibration
        values = dict(
            router_steps=defaults.router_steps,
            router_learning_rate=defaults.router_learning_rate,
            alpha_steps=defaults.alpha_steps,
            alpha_learning_rate=defaults.alpha_learning_rate,
            tau=defaults.tau,
        )
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def steps_per_layer(self) -> int:
        """Optimizer steps one trainable layer takes (alpha is fitted twice when the router trains)."""
        return self.alpha_steps + (self.router_steps + self.alpha_steps if self.train_router else 0)


def check_calibration_settings(settings: CalibrationSettings) -> None:
    """User mistakes in the training options, reported with the option that sets them."""
    for option, steps in (("--router-steps", settings.router_steps), ("--alpha-steps", settings.alpha_steps)):
        if steps < 0:
            raise UserError(f"{option} must be 0 or more, got {steps}")
    check_positive_number(settings.router_learning_rate, "--router-lr", "1e-3")
    check_positive_number(settings.alpha_learning_rate, "--alpha-lr", "1e-3")
    check_positive_number(settings.tau, "--tau", "0.1")
    if settings.alpha_steps == 0 and not (settings.train_router and settings.router_steps > 0):
        raise UserError("nothing to train: give --alpha-steps or --router-steps above 0")


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
    """Hard-routing relative L2 error (mean over calls and heads) before and for each candidate, the true
    softmax mass captured by the hard top-k blocks before and after (NaN when the router was not
    trained), and what the layer kept: `UNCHANGED`, `ALPHA_ONLY` or `ROUTER_AND_ALPHA`."""

    name: str
    rel_l2_before: float
    rel_l2_alpha_only: float
    rel_l2_router: float
    mass_before: float
    mass_after: float
    choice: str
    trained: bool

    @property
    def kept(self) -> bool:
        return self.choice != UNCHANGED

    @property
    def rel_l2_final(self) -> float:
        """Hard-routing error of the parameters the layer ends with."""
        return {ALPHA_ONLY: self.rel_l2_alpha_only, ROUTER_AND_ALPHA: self.rel_l2_router}.get(
            self.choice, self.rel_l2_before
        )


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


@torch.no_grad()
def mean_hard_error(layer: SLA2Attention, calls: list[CapturedCall]) -> float:
    """Relative L2 of the layer's hard-routing output against dense per (batch, head), averaged over heads
    and calls: the report's `rel_l2_error` on the captured calls."""
    errors = [relative_l2_error(layer(call.q, call.k, call.v).float(), call.dense.float()).mean() for call in calls]
    return torch.stack(errors).mean().item()


def _snapshot(layer: SLA2Attention) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in layer.state_dict().items()}


def _fit_alpha_for_current_router(
    layer: SLA2Attention, calls: list[CapturedCall], settings: CalibrationSettings, on_step: Callable[[], None] | None
) -> float:
    """Fit alpha for the router the layer has now; the hard-routing error it ends with."""
    if settings.alpha_steps:
        coefficients = [mix_coefficients(layer, call.q, call.k, call.v, call.dense) for call in calls]
        fit_alpha(
            layer, coefficients, steps=settings.alpha_steps, learning_rate=settings.alpha_learning_rate,
            on_step=on_step,
        )
    return mean_hard_error(layer, calls)


def calibrate_layer(
    name: str,
    layer: SLA2Attention,
    calls: list[CapturedCall],
    settings: CalibrationSettings,
    on_step: Callable[[], None] | None = None,
) -> LayerResult:
    """Fit alpha for the router the layer has, and (train_router) a new router with its own alpha; keep the
    candidate with the lowest hard-routing error, or the previous parameters if neither beats them.

    Layers whose router cannot matter (every key block kept) are measured but not trained.
    """
    error_before = mean_hard_error(layer, calls)
    if not all(has_router_to_train(layer, call.length) for call in calls):
        if on_step is not None:
            for _ in range(settings.steps_per_layer()):
                on_step()
        return LayerResult(name, error_before, math.nan, math.nan, math.nan, math.nan, UNCHANGED, False)
    previous = _snapshot(layer)
    candidates: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
    error_alpha = error_router = mass_before = mass_after = math.nan
    if settings.alpha_steps:
        error_alpha = _fit_alpha_for_current_router(layer, calls, settings, on_step)
        candidates[ALPHA_ONLY] = (error_alpha, _snapshot(layer))
    if settings.train_router:
        layer.load_state_dict(previous)
        targets = [router_target(c.q, c.k, layer, settings.max_chunk_elements) for c in calls]
        mass_before = hard_captured_mass(layer, targets)
        train_router(
            layer, targets, steps=settings.router_steps, learning_rate=settings.router_learning_rate,
            tau=settings.tau, on_step=on_step,
        )
        mass_after = hard_captured_mass(layer, targets)
        del targets
        error_router = _fit_alpha_for_current_router(layer, calls, settings, on_step)
        candidates[ROUTER_AND_ALPHA] = (error_router, _snapshot(layer))
    choice, (best_error, best_state) = min(candidates.items(), key=lambda item: item[1][0], default=(UNCHANGED, (
        error_before, previous
    )))
    if best_error > error_before:
        choice, best_state = UNCHANGED, previous
    layer.load_state_dict(best_state)
    if choice != ROUTER_AND_ALPHA and not math.isnan(mass_before):
        mass_after = mass_before  # the router the layer ends with is the one it had
    return LayerResult(name, error_before, error_alpha, error_router, mass_before, mass_after, choice, True)


def calibrate_layers(
    layers: dict[str, SLA2Attention],
    calls: dict[str, list[CapturedCall]],
    settings: CalibrationSettings,
    on_step: Callable[[], None] | None = None,
) -> list[LayerResult]:
    """Calibrate every layer that was called, one after the other (each is independent of the others)."""
    return [
        calibrate_layer(name, layer, calls[name], settings, on_step)
        for name, layer in layers.items()
        if calls.get(name)
    ]


def summary_measurements(results: list[LayerResult], settings: CalibrationSettings) -> dict[str, float | int]:
    """Flat figures for the checkpoint's model card: layer means of the hard-routing error before, with
    alpha refitted alone and at the end, of the captured mass, and what the layers kept."""

    def mean(values: list[float]) -> float:
        defined = [value for value in values if not math.isnan(value)]
        return round(sum(defined) / len(defined), 5) if defined else math.nan

    return {
        "calibration_router_steps": settings.router_steps if settings.train_router else 0,
        "calibration_alpha_steps": settings.alpha_steps,
        "calibration_rel_l2_before": mean([r.rel_l2_before for r in results]),
        "calibration_rel_l2_alpha_only": mean([r.rel_l2_alpha_only for r in results]),
        "calibration_rel_l2_after": mean([r.rel_l2_final for r in results]),
        "calibration_captured_mass_before": mean([r.mass_before for r in results]),
        "calibration_captured_mass_after": mean([r.mass_after for r in results]),
        "calibration_layers_kept": sum(r.kept for r in results),
        "calibration_layers_with_trained_router": sum(r.choice == ROUTER_AND_ALPHA for r in results),
    }
