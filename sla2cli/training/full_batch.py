"""Full-batch Adam on a few chosen tensors of a layer: what both stage-1 fits (router, alpha) run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def adam_full_batch(
    parameters: Sequence[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
    on_step: Callable[[], None] | None = None,
) -> None:
    """`steps` Adam steps on `parameters` against `loss()`; their requires_grad flags end as they were and
    their gradients are dropped, so the layer is left as the caller had it apart from the values."""
    trained_before = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    try:
        for _ in range(steps):
            value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
    finally:
        for parameter, flag in zip(parameters, trained_before, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = None
