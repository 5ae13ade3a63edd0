"""Conversion: give every self-attention module of a model an SLA2 processor, per the model's recipe.

Cross-attention modules are never touched; a converted module still hands calls with a mask or a
different key/value sequence to its original dense processor. The model keeps a `ConversionInfo`
(recipe, base model, settings, converted module names), which is what a checkpoint records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from sla2cli.errors import UserError
from sla2cli.flops import LayerAttention
from sla2cli.integration.processors import PROCESSORS, SLA2Processor
from sla2cli.integration.recipes import EMBEDDED_RECIPE, Recipe, get_recipe
from sla2cli.module import SLA2Attention
from sla2cli.ops.quantization import QUANT_NONE, check_quant
from sla2cli.ops.validation import check_head_dim
from sla2cli.sources.base import BaseModelRef

INFO_ATTRIBUTE = "sla2_conversion"
DENSE_PROCESSORS: dict[str, type] = {"wan": WanAttnProcessor, "cogvideox": CogVideoXAttnProcessor2_0}


@dataclass(frozen=True)
class ConversionInfo:
    """What was converted in one model component, and from what."""

    recipe: str
    component: str
    base: BaseModelRef
    converted_modules: tuple[str, ...]


def self_attention_modules(model: nn.Module, recipe: Recipe) -> dict[str, tuple[int, nn.Module]]:
    """The recipe's self-attention modules of `model`: name -> (layer index, module), in model order."""
    found = {}
    for name, module in model.named_modules():
        layer = recipe.attention.layer_index(name)
        if layer is not None:
            found[name] = (layer, module)
    return found


def _head_geometry(attn: nn.Module, name: str) -> tuple[int, int]:
    heads = attn.heads
    head_dim = attn.inner_dim // heads
    try:
        check_head_dim(head_dim, f"the head dim of {name}")
    except ValueError as error:
        raise UserError(f"{error}; this model cannot be converted") from None
    return heads, head_dim


def _parameter_device(module: nn.Module) -> torch.device:
    """Where the module's weights live; a skeleton on the meta device gets real CPU SLA2 parameters."""
    device = next(module.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def convert_component(
    model: nn.Module,
    recipe: Recipe,
    *,
    component: str,
    base: BaseModelRef,
    sparsity: float,
    block_q: int,
    block_k: int,
    modules: tuple[str, ...] | None = None,
    quant: str = QUANT_NONE,
) -> ConversionInfo:
    """Attach SLA2 processors in place; `modules` (from a checkpoint) names exactly which ones.

    Without `modules`, every self-attention layer except the recipe's dense layers is converted.
    `quant` is checked before anything changes, so a bad mode leaves the model untouched.
    """
    quant = check_quant(quant)
    if getattr(model, INFO_ATTRIBUTE, None) is not None:
        raise UserError(f"the {component} is already converted to SLA2; convert the original model instead")
    candidates = self_attention_modules(model, recipe)
    if not candidates:
        raise UserError(
            f"no module of the {component} matches {recipe.attention.self_attention}; "
            f"is recipe {recipe.name} right for this {type(model).__name__}?"
        )
    if modules is None:
        chosen = [name for name, (layer, _) in candidates.items() if layer not in recipe.dense_layers]
    else:
        unknown = [name for name in modules if name not in candidates]
        if unknown:
            raise UserError(
                f"the checkpoint converts {', '.join(unknown[:3])}, which the {component} has no "
                "self-attention module of; it was made for a different model"
            )
        chosen = list(modules)
    dense_class = DENSE_PROCESSORS[recipe.attention.processor]
    processor_class = PROCESSORS[recipe.attention.processor]
    plans = []
    for name in chosen:
        attn = candidates[name][1]
        if not isinstance(attn.processor, dense_class) or getattr(attn, "is_cross_attention", False):
            raise UserError(
                f"{name} runs {type(attn.processor).__name__}, not {dense_class.__name__}; convert the "
                "model before fusing projections or setting other attention processors"
            )
        plans.append((attn, *_head_geometry(attn, name)))
    for attn, heads, head_dim in plans:
        sla2 = SLA2Attention(heads, head_dim, sparsity=sparsity, block_q=block_q, block_k=block_k, quant=quant)
        attn.set_processor(processor_class(sla2.to(_parameter_device(attn)), attn.processor))
    info = ConversionInfo(recipe=recipe.name, component=component, base=base, converted_modules=tuple(chosen))
    setattr(model, INFO_ATTRIBUTE, info)
    return info


def convert_embedded(model: nn.Module, *, sparsity: float, block_q: int, block_k: int, quant: str) -> ConversionInfo:
    """Convert the embedded model's transformer in place with its own recipe (its base is the embedded model)."""
    return convert_component(
        model, get_recipe(EMBEDDED_RECIPE), component="transformer", base=BaseModelRef(source="embedded"),
        sparsity=sparsity, block_q=block_q, block_k=block_k, quant=quant,
    )


def convert_with_recipe(
    components: dict[str, nn.Module],
    recipe: Recipe,
    *,
    base: BaseModelRef,
    sparsity: float | None = None,
    quant: str = QUANT_NONE,
) -> None:
    """Convert each component with the recipe's block sizes and sparsity (unless `sparsity` is given)."""
    for name, model in components.items():
        convert_component(
            model, recipe, component=name, base=base,
            sparsity=recipe.sparsity if sparsity is None else sparsity,
            block_q=recipe.block_q, block_k=recipe.block_k, quant=quant,
        )


def conversion_info(model: nn.Module) -> ConversionInfo | None:
    """The model's ConversionInfo, or None if it was never converted."""
    return getattr(model, INFO_ATTRIBUTE, None)


def sla2_processors(model: nn.Module) -> dict[str, SLA2Processor]:
    """Converted module name -> its SLA2 processor, in model order."""
    return {
        name: module.processor
        for name, module in model.named_modules()
        if isinstance(getattr(module, "processor", None), SLA2Processor)
    }


def sla2_layers(model: nn.Module) -> dict[str, SLA2Attention]:
    """Converted module name -> its SLA2Attention (what calibration trains and reports read)."""
    return {name: processor.sla2 for name, processor in sla2_processors(model).items()}


def model_settings(model: nn.Module) -> tuple[float, int, int]:
    """(sparsity, block_q, block_k) shared by all converted layers of the model."""
    settings = {(layer.sparsity, layer.block_q, layer.block_k) for layer in sla2_layers(model).values()}
    if len(settings) != 1:
        raise ValueError(f"converted layers disagree on (sparsity, block_q, block_k): {sorted(settings)}")
    return settings.pop()


def model_quant(model: nn.Module) -> str:
    """The quantisation mode shared by all converted layers of the model (a checkpoint stores one)."""
    modes = {layer.quant for layer in sla2_layers(model).values()}
    if len(modes) != 1:
        raise ValueError(f"converted layers disagree on the quantisation mode: {sorted(modes)}")
    return modes.pop()


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Change the sparsity of every converted layer (the router parameters do not depend on it)."""
    for layer in sla2_layers(model).values():
        layer.sparsity = sparsity


@contextmanager
def dense_processors(model: nn.Module) -> Iterator[None]:
    """Put the dense processors back for the duration (e.g. to save the base weights in diffusers layout,
    without SLA2 parameters mixed into them), then restore the SLA2 processors."""
    converted = sla2_processors(model)
    modules = {name: module for name, module in model.named_modules() if name in converted}
    saved = {name: module.processor for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.set_processor(saved[name].dense_processor)
        yield
    finally:
        for name, module in modules.items():
            module.set_processor(saved[name])


def attention_layers(model: nn.Module, recipe: Recipe) -> list[LayerAttention]:
    """Every self-attention layer with its shape and, where converted, its SLA2 settings (for FLOPs)."""
    converted = sla2_layers(model)
    layers = []
    for name, (_, attn) in self_attention_modules(model, recipe).items():
        heads, head_dim = attn.heads, attn.inner_dim // attn.heads
        layer = converted.get(name)
        if layer is None:
            layers.append(LayerAttention(heads=heads, head_dim=head_dim, sparsity=None))
        else:
            layers.append(LayerAttention(heads, head_dim, layer.sparsity, layer.block_q, layer.block_k))
    return layers
