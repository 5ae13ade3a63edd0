"""Hooks on the converted layers of a model: see q, k, v at every SLA2 call while the model runs.

The hook replaces the layer instance's `forward` attribute rather than using `register_forward_hook`:
model integrations may call `forward` or `forward_bshd` directly, which bypasses nn.Module hooks but
not an instance attribute. Everything is restored on exit, even after an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sla2cli.module import SLA2Attention
from sla2cli.ops import Routing
from sla2cli.report.metrics import DEFAULT_CHUNK_ELEMENTS, attention_metrics
from sla2cli.report.summary import MetricAccumulator

AttentionForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LayerCallback = Callable[[str], None]


def find_sla2_layers(model: nn.Module) -> dict[str, SLA2Attention]:
    """Every SLA2Attention inside `model`, by qualified module name, in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SLA2Attention)}


@contextmanager
def wrapped_forwards(
    layers: dict[str, SLA2Attention],
    make_forward: Callable[[str, SLA2Attention, AttentionForward], AttentionForward],
) -> Iterator[None]:
    """Swap each layer's forward for `make_forward(name, layer, original_forward)` inside the block."""
    installed = []
    try:
        for name, layer in layers.items():
            original = layer.forward
            layer.forward = make_forward(name, layer, original)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            del layer.forward  # the class method shows through again


def layer_alpha(layer: SLA2Attention) -> Callable[[Routing, int], torch.Tensor | None]:
    """The layer's alpha rule: predicted per query block, or none when every key block is exact."""

    def alpha(routing: Routing, length: int) -> torch.Tensor | None:
        return None if routing.all_selected else layer.predict_alpha(routing, length)

    return alpha


@contextmanager
def capture_metrics(
    layers: dict[str, SLA2Attention],
    accumulator: MetricAccumulator,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    on_layer: LayerCallback | None = None,
    lowbit_quant: str | None = None,
) -> Iterator[None]:
    """While inside, every SLA2 call also adds its metrics (vs full attention) to `accumulator`.

    The model's own output is unchanged: the layer still returns its SLA2 result. A concrete low-bit
    `lowbit_quant` also measures that mode against the unquantised op on the same call.
    """

    def make_forward(name: str, layer: SLA2Attention, original: AttentionForward) -> AttentionForward:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = original(q, k, v)
            values = attention_metrics(
                q, k, v,
                sparsity=layer.sparsity,
                proj_q=layer.proj_q.detach(),
                proj_k=layer.proj_k.detach(),
                alpha_fn=layer_alpha(layer),
                block_q=layer.block_q,
                block_k=layer.block_k,
                max_chunk_elements=max_chunk_elements,
                output=out,
                quant=layer.resolved_quant(q),
                lowbit_quant=lowbit_quant,
            )
            accumulator.add(name, values)
            if on_layer is not None:
                on_layer(name)
            return out

        return forward

    with wrapped_forwards(layers, make_forward):
        yield


@contextmanager
def dense_attention(layers: dict[str, SLA2Attention]) -> Iterator[None]:
    """While inside, converted layers compute full softmax attention: the dense model, same weights."""

    def make_forward(name: str, layer: SLA2Attention, original: AttentionForward) -> AttentionForward:
        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return forward

    with wrapped_forwards(layers, make_forward):
        yield


@contextmanager
def overridden_sparsity(layers: dict[str, SLA2Attention], sparsity: float | None) -> Iterator[None]:
    """Run every layer at `sparsity` inside the block (None keeps each layer's own), then restore."""
    previous = {name: layer.sparsity for name, layer in layers.items()}
    try:
        if sparsity is not None:
            for layer in layers.values():
                layer.sparsity = sparsity
        yield
    finally:
        for name, layer in layers.items():
            layer.sparsity = previous[name]
