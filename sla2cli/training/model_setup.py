"""Getting a model ready to fine-tune: float32 master weights on the device, the quant mode, what trains,
gradient checkpointing; the frozen dense teacher; the validation figures of the start."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sla2cli.errors import UserError
from sla2cli.integration.conversion import INFO_ATTRIBUTE, dense_processors, sla2_layers, sla2_processors
from sla2cli.ops.quantization import QUANT_NONE, check_quant
from sla2cli.training.data import ValidationSet
from sla2cli.training.objectives import VALIDATION_CHUNK, validation_loss
from sla2cli.training.optim import TrainChoice, select_trainable


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters to `dtype`, keeping the model's `_keep_in_fp32_modules` in float32
    when casting down (as diffusers does when it loads in half precision); buffers stay as they are."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype != torch.float32 else ()
    for name, parameter in model.named_parameters():
        target = torch.float32 if any(pattern in name for pattern in keep) else dtype
        if parameter.is_floating_point() and parameter.dtype != target:
            parameter.data = parameter.data.to(target)


def prepare_for_training(
    model: nn.Module,
    *,
    device: torch.device,
    quant: str | None,
    train: TrainChoice,
    gradient_checkpointing: bool,
) -> list[str]:
    """Move the model to `device` in float32 (the optimizer's master weights; the forward runs under bf16
    autocast on GPUs), set every SLA2 layer's quant mode (None keeps it), choose what trains, turn on
    gradient checkpointing; returns the names of the trainable parameters."""
    layers = sla2_layers(model)
    if quant is not None and check_quant(quant) != QUANT_NONE and not layers:
        raise UserError(f"quant {quant!r} needs a model converted to SLA2; this one has no SLA2 layer")
    model.to(device=device)
    cast_weights(model, torch.float32)
    if quant is not None:
        for layer in layers.values():
            layer.quant = quant
    names = select_trainable(model, train)
    if gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise UserError(f"{type(model).__name__} does not support gradient checkpointing; "
                            "pass --no-gradient-checkpointing")
        model.enable_gradient_checkpointing()
    model.train()
    return names


def frozen_dense_teacher(model: nn.Module, dtype: torch.dtype, *, copy_model: bool = True) -> nn.Module:
    """A frozen copy of the model as it is now (or the model itself), with its own dense attention on
    every converted layer: the `distill` objective's target. It costs one more copy of the weights."""
    teacher = copy.deepcopy(model) if copy_model else model
    for name, processor in sla2_processors(teacher).items():
        teacher.get_submodule(name).set_processor(processor.dense_processor)
    if getattr(teacher, INFO_ATTRIBUTE, None) is not None:
        setattr(teacher, INFO_ATTRIBUTE, None)
    cast_weights(teacher, dtype)
    return teacher.eval().requires_grad_(False)


def start_figures(model: nn.Module, validation: ValidationSet, use_autocast: bool) -> tuple[float, float]:
    """(validation loss of the model as given, of the same weights with dense attention)."""
    was_training = model.training
    model.eval()
    try:
        def measure() -> float:
            return validation_loss(model, validation.clean, validation.text, use_autocast,
                                   extras=validation.extras, chunk_size=VALIDATION_CHUNK)

        before = measure()
        if not sla2_processors(model):
            return before, before
        with dense_processors(model):
            return before, measure()
    finally:
        model.train(was_training)
