"""What trains and how: the trainable-parameter choice, AdamW parameter groups, the learning-rate update.

Fine-tuning (docs/method.md, section 9) trains every base weight and the alpha parameters with hard
routing while the router's projections stay frozen; `train` lets a caller choose another set (the
quality suite compares variants), and SLA2's own parameters may get their own learning rate.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_processors

TRAIN_ALL = "all"
ROUTER_PARAMETERS = ("proj_q", "proj_k")
ADAM_BETAS = (0.9, 0.99)
TrainChoice = str | Sequence[str] | Callable[[str, nn.Parameter], bool]


def is_decayed(name: str, parameter: torch.Tensor) -> bool:
    """Decay only weight matrices: decaying the q/k norm gains would pull attention back towards uniform."""
    return parameter.dim() >= 2 and "scale_shift_table" not in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups for training every parameter: weight matrices decayed, gains and biases not."""
    matrices, others = [], []
    for name, parameter in model.named_parameters():
        (matrices if is_decayed(name, parameter) else others).append(parameter)
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def sla2_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the SLA2 layers' parameters (router projections and alpha predictor)."""
    return {
        f"{module}.processor.{name}"
        for module, processor in sla2_processors(model).items()
        for name, _ in processor.named_parameters()
    }


def is_router_parameter(name: str, sla2_names: set[str]) -> bool:
    return name in sla2_names and name.rsplit(".", 1)[-1] in ROUTER_PARAMETERS


def select_trainable(model: nn.Module, train: TrainChoice = TRAIN_ALL) -> list[str]:
    """Set requires_grad on every parameter of `model` and return the names of those that train.

    `train`: "all" (every parameter but the SLA2 router projections, which stay frozen), a list of
    fnmatch patterns of parameter names (e.g. ["*.alpha_*", "blocks.*.attn1.*"]), or a predicate
    (name, parameter) -> bool.
    """
    sla2_names = sla2_parameter_names(model)
    if isinstance(train, str):
        if train != TRAIN_ALL:
            raise ValueError(f"train must be 'all', a list of name patterns or a predicate; got {train!r}")

        def chosen(name: str, _: nn.Parameter) -> bool:
            return not is_router_parameter(name, sla2_names)
    elif callable(train):
        chosen = train
    else:
        patterns = list(train)

        def chosen(name: str, _: nn.Parameter) -> bool:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    names = []
    for name, parameter in model.named_parameters():
        wanted = bool(chosen(name, parameter))
        parameter.requires_grad_(wanted)
        if wanted:
            names.append(name)
    if not names:
        raise UserError("no parameter of the model matches the trainable-parameter choice; nothing would train")
    return names


def finetune_parameter_groups(
    model: nn.Module, *, learning_rate: float, sla2_learning_rate: float | None, weight_decay: float
) -> list[dict]:
    """AdamW groups over the parameters that require grad: decayed base matrices, other base parameters,
    and the SLA2 parameters (never decayed; their own peak rate when `sla2_learning_rate` is given).

    Each group records its peak rate as `peak_lr`; the schedule scales it every step.
    """
    sla2_names = sla2_parameter_names(model)
    buckets: dict[str, list[nn.Parameter]] = {"decayed": [], "other": [], "sla2": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        bucket = "sla2" if name in sla2_names else ("decayed" if is_decayed(name, parameter) else "other")
        buckets[bucket].append(parameter)
    sla2_rate = learning_rate if sla2_learning_rate is None else sla2_learning_rate
    settings = {
        "decayed": (learning_rate, weight_decay),
        "other": (learning_rate, 0.0),
        "sla2": (sla2_rate, 0.0),
    }
    return [
        {"params": params, "lr": settings[key][0], "peak_lr": settings[key][0], "weight_decay": settings[key][1],
         "group": key}
        for key, params in buckets.items()
        if params
    ]


def build_optimizer(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW with the betas the embedded model was trained with."""
    return torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=1e-8)


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's peak rate by the schedule's factor; return the first group's rate (for logs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return optimizer.param_groups[0]["lr"]
