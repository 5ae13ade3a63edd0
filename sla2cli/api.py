"""Python API: convert a model you hold, load a converted model (or convert one on the fly), save one.

    import sla2cli
    pipe.transformer = ...                      # any supported diffusers transformer, or the pipeline
    sla2cli.convert(pipe, sparsity=0.97)        # in place; converts transformer_2 too for Wan2.2 A14B
    sla2cli.convert(pipe, quant="auto")         # low-bit sparse-branch forward where measured faster
    sla2cli.save(pipe, "wan-sla2")              # sla2_config.json + sla2_attention.safetensors + README.md
    model = sla2cli.load("wan-sla2")            # base weights from the Hub cache, SLA2 layers from the folder
    summary = sla2cli.finetune(model, "latents/", steps=2000)   # stage 2 in memory (see sla2cli.training)
    sla2cli.save(model, "wan-sla2-ft", include_base_weights=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sla2cli.checkpoint.storage import open_converted, write_checkpoint
from sla2cli.devices import model_dtype
from sla2cli.errors import UserError
from sla2cli.integration.conversion import conversion_info, convert_component
from sla2cli.integration.recipes import (
    EMBEDDED_SOURCE,
    Recipe,
    get_recipe,
    recipe_for_architecture,
    recipe_for_hub_id,
)
from sla2cli.ops.quantization import QUANT_NONE, check_quant
from sla2cli.sources.base import BaseModelRef, base_ref_from_name_or_path
from sla2cli.sources.locate import locate
from sla2cli.sources.spec import parse_model_spec
from sla2cli.training.finetune import evaluate, finetune
from sla2cli.training.variants import check_saveable

__all__ = ["convert", "evaluate", "finetune", "load", "save"]

COMPONENT_NAMES = ("transformer", "transformer_2")


def _components_of(model_or_pipeline: Any) -> dict[str, nn.Module]:
    """The transformers to convert: a model on its own, a dict of them, or a pipeline's attributes."""
    if isinstance(model_or_pipeline, dict):
        return dict(model_or_pipeline)
    if isinstance(model_or_pipeline, nn.Module):
        return {"transformer": model_or_pipeline}
    found = {name: getattr(model_or_pipeline, name, None) for name in COMPONENT_NAMES}
    found = {name: model for name, model in found.items() if isinstance(model, nn.Module)}
    if not found:
        raise TypeError(
            f"expected a diffusers transformer, a pipeline with .transformer, or a dict of models; "
            f"got {type(model_or_pipeline).__name__}"
        )
    return found


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return config.get("_name_or_path") if config is not None else None


def _detect_recipe(components: dict[str, nn.Module], recipe: str | None) -> Recipe:
    if recipe is not None:
        chosen = get_recipe(recipe)
    else:
        main = components.get("transformer") or next(iter(components.values()))
        by_id = base_ref_from_name_or_path(_name_or_path(main))
        chosen = recipe_for_hub_id(by_id.repo_id) if by_id.source == "hub" else None
        if chosen is None:
            config = dict(getattr(main, "config", {}))
            chosen = recipe_for_architecture(type(main).__name__, config, set(components))
    missing = [name for name in chosen.components if name not in components]
    extra = [name for name in components if name not in chosen.components]
    if missing or extra:
        raise UserError(
            f"recipe {chosen.name} converts {', '.join(chosen.components)}, but got {', '.join(components)}; "
            "pass the pipeline or a dict with exactly those transformers"
        )
    for name in chosen.components:
        if type(components[name]).__name__ != chosen.model_class:
            raise UserError(f"recipe {chosen.name} expects a {chosen.model_class} as {name}")
    return chosen


def convert(
    model_or_pipeline: Any,
    sparsity: float | None = None,
    recipe: str | None = None,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    quant: str = QUANT_NONE,
) -> Any:
    """Swap the self-attention of a model (or of a pipeline's transformers) for SLA2, in place.

    The recipe is found from the model's Hub id or architecture unless named. Sparsity and block sizes
    default to the recipe's. `quant` runs the sparse branch's forward in low precision (none, int8-fp8,
    int8, or auto: per call, int8 only where a recorded measurement found it faster than bf16 on that GPU,
    head dim and shape, else bf16; see ops.quantization.choose_auto_quant); the backward stays
    unquantised. Returns the object it was given.
    """
    quant = check_quant(quant)
    components = _components_of(model_or_pipeline)
    chosen = _detect_recipe(components, recipe)
    for name, model in components.items():
        base = (
            BaseModelRef(source="embedded")
            if chosen.source == EMBEDDED_SOURCE
            else base_ref_from_name_or_path(_name_or_path(model))
        )
        convert_component(
            model, chosen, component=name, base=base,
            sparsity=chosen.sparsity if sparsity is None else sparsity,
            block_q=block_q or chosen.block_q, block_k=block_k or chosen.block_k, quant=quant,
        )
    return model_or_pipeline


def _single_or_dict(components: dict[str, nn.Module]) -> nn.Module | dict[str, nn.Module]:
    return next(iter(components.values())) if len(components) == 1 else components


def load(
    path_or_id: str | Path | None = None,
    *,
    sparsity: float | None = None,
    recipe: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    offline: bool = False,
    quant: str | None = None,
) -> nn.Module | dict[str, nn.Module]:
    """A converted model, ready to run.

    `path_or_id` is an SLA2 checkpoint (folder or Hub id), or a base model (Hub id `org/name[@rev]`,
    diffusers folder, None for the embedded model), which is then converted with the recipe's defaults.
    Returns the transformer, or a dict by component name when there are several (Wan2.2 A14B).
    dtype defaults to bfloat16 on CUDA and float32 elsewhere; `sparsity` and `quant` override the stored
    settings (a base model converted here gets `quant`, default none).
    """
    if quant is not None:
        quant = check_quant(quant)
    dtype = model_dtype(device, dtype)
    spec = parse_model_spec(None if path_or_id is None else str(path_or_id))
    components = open_converted(
        locate(spec, offline=offline), weights=True, dtype=dtype, device=device, sparsity=sparsity, quant=quant,
        recipe=recipe,
    )
    return _single_or_dict(components)


def save(
    model_or_pipeline: Any,
    path: str | Path,
    *,
    include_base_weights: bool | None = None,
    overwrite: bool = False,
    measurements: dict[str, Any] | None = None,
) -> Path:
    """Write a converted model as an SLA2 checkpoint folder (atomically).

    Base weights are referenced (Hub id + commit, folder, or embedded) unless `include_base_weights`;
    None means: include them only when the model has no such reference. Fine-tuning, which changes
    them, saves with include_base_weights=True (diffusers layout, sharded safetensors).
    """
    components = _components_of(model_or_pipeline)
    for model in components.values():
        check_saveable(model)
    out = Path(path)
    if include_base_weights is None:
        include_base_weights = any(
            (info := conversion_info(model)) is not None and not info.base.referencable
            for model in components.values()
        )
    write_checkpoint(
        out, components, include_base_weights=include_base_weights, overwrite=overwrite, measurements=measurements
    )
    return out
