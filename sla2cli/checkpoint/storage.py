"""Write and open SLA2 checkpoints (format in `checkpoint_format`).

Opening rebuilds the base model from its record (Hub commit, folder, embedded, or the included weights),
converts exactly the modules the checkpoint lists, and loads the SLA2 parameters strictly: a missing,
unexpected or mis-shaped key is an error, never a silently fresh layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from sla2cli.checkpoint.card import render_model_card
from sla2cli.checkpoint.format import (
    ATTENTION_FILE,
    CARD_FILE,
    CONFIG_FILE,
    SCHEMA_VERSION,
    CheckpointConfig,
    ComponentRecord,
    read_config,
)
from sla2cli.errors import UserError
from sla2cli.files import atomic_folder
from sla2cli.flops import FlopEstimate, estimate_model_flops
from sla2cli.integration.conversion import (
    attention_layers,
    conversion_info,
    convert_component,
    convert_with_recipe,
    model_quant,
    model_settings,
    sla2_layers,
)
from sla2cli.integration.recipes import Recipe, get_recipe
from sla2cli.ops.quantization import QUANT_NONE
from sla2cli.sources.base import BaseModelRef
from sla2cli.sources.components import model_class_name
from sla2cli.sources.folders import read_component
from sla2cli.sources.hub import weight_patterns
from sla2cli.sources.locate import ModelLocation, ModelSource, base_source, build_components, locate
from sla2cli.sources.safetensors_check import read_header
from sla2cli.sources.spec import ModelSpec
from sla2cli.version import __version__

MAX_SHARD_SIZE = "5GB"


def attention_tensors(components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every converted layer's SLA2 parameters, keyed `<component>.<module>.<parameter>`, float32 on CPU."""
    tensors = {}
    for component, model in components.items():
        for module_name, layer in sla2_layers(model).items():
            for key, value in layer.state_dict().items():
                tensors[f"{component}.{module_name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return tensors


def split_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A converted model's full state dict split into (base weights, SLA2 parameters by layer key).

    SLA2 parameters live in the processors (`<module>.processor.sla2.<name>`); the base weights are all
    the rest, keyed as the unconverted model keys them. Keys of the SLA2 part are `<module>.<name>`.
    """
    prefixes = {f"{module}.processor.sla2.": module for module in sla2_layers(model)}
    base, attention = {}, {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            base[key] = value
        else:
            attention[f"{prefixes[prefix]}.{key[len(prefix):]}"] = value
    return base, attention


def save_component_weights(folder: Path, model: diffusers.ModelMixin, weights: dict[str, torch.Tensor]) -> None:
    """`weights` in diffusers layout (config.json, sharded safetensors and index), as save_pretrained writes
    them, but from a given state dict: e.g. one gathered from a model sharded over processes."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    config_path = folder / "config.json"  # diffusers names the class it sees: FSDP<Name> for a sharded model
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["_class_name"] = model_class_name(model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(weights, max_shard_size=MAX_SHARD_SIZE, filename_pattern=pattern)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: weights[name].detach().to("cpu").contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flop_estimate(components: dict[str, nn.Module], recipe: Recipe) -> FlopEstimate:
    """Self-attention FLOPs of all components at the recipe's default resolution."""
    layers = [layer for model in components.values() for layer in attention_layers(model, recipe)]
    return estimate_model_flops(layers, recipe.default_tokens())


def describe_components(
    components: dict[str, nn.Module],
) -> tuple[Recipe, BaseModelRef, tuple[float, int, int, str], dict[str, ComponentRecord]]:
    """Recipe, base record, shared (sparsity, block_q, block_k, quant) and per-component records."""
    infos = {name: conversion_info(model) for name, model in components.items()}
    unconverted = [name for name, info in infos.items() if info is None]
    if unconverted:
        raise ValueError(f"{', '.join(unconverted)} is not converted; call sla2cli.convert first")
    recipes = {info.recipe for info in infos.values()}
    bases = {info.base for info in infos.values()}
    settings = {(*model_settings(model), model_quant(model)) for model in components.values()}
    if len(recipes) != 1 or len(bases) != 1 or len(settings) != 1:
        raise ValueError("the components were converted from different models or with different settings")
    records = {
        name: ComponentRecord(model_class=model_class_name(model), converted_modules=infos[name].converted_modules)
        for name, model in components.items()
    }
    return get_recipe(recipes.pop()), bases.pop(), settings.pop(), records


def check_not_over_base(out: Path, base: BaseModelRef) -> None:
    """Replacing a folder the base weights are referenced from (or one holding it) would destroy them."""
    if base.source != "local":
        return
    out, folder = Path(out).expanduser().resolve(), Path(base.path).resolve()
    if out == folder or out in folder.parents:
        raise UserError(f"{out} would replace the base model folder {folder}; choose another output folder")


def write_checkpoint(
    out: Path,
    components: dict[str, nn.Module],
    *,
    include_base_weights: bool,
    overwrite: bool,
    measurements: dict[str, Any] | None = None,
    states: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_files: Callable[[Path], None] | None = None,
) -> CheckpointConfig:
    """Write config, SLA2 parameters, model card (and base weights if asked) into `out`, atomically.

    An existing `out` is replaced only with `overwrite` and only when sla2 wrote all of it (see
    `atomic.replacement_refusal`).
    `states` are the components' full state dicts when the modules cannot give them (sharded over
    processes); `extra_files(folder)` adds files of the caller's to the folder before it is published.
    """
    recipe, base, (sparsity, block_q, block_k, quant), records = describe_components(components)
    check_not_over_base(out, base)
    if not include_base_weights and not base.referencable:
        raise UserError("this model has no Hub id or folder to refer to; save it with include_base_weights=True")
    if states is None:
        states = {name: model.state_dict() for name, model in components.items()}
    parts = {name: split_state(model, states[name]) for name, model in components.items()}
    tensors = {
        f"{name}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for name, (_, attention) in parts.items()
        for key, value in attention.items()
    }
    with atomic_folder(out, overwrite=overwrite) as folder:
        metadata = {"format": "sla2", "schema": str(SCHEMA_VERSION)}
        (folder / ATTENTION_FILE).write_bytes(save(tensors, metadata=metadata))
        if include_base_weights:
            for name, model in components.items():
                save_component_weights(folder / name, model, parts[name][0])
        if extra_files is not None:
            extra_files(folder)
        config = CheckpointConfig(
            sla2_version=__version__,
            recipe=recipe.name,
            base=base,
            base_weights="included" if include_base_weights else "referenced",
            components=records,
            sparsity=sparsity,
            block_q=block_q,
            block_k=block_k,
            quantization=quant,
            attention_sha256=_sha256(folder / ATTENTION_FILE),
            measurements=dict(measurements or {}),
        )
        (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        card = render_model_card(config, recipe, flop_estimate(components, recipe))
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return config


def _read_attention_file(folder: Path, config: CheckpointConfig) -> dict[str, torch.Tensor]:
    path = folder / ATTENTION_FILE
    if not path.is_file():
        raise UserError(f"{folder} lacks {ATTENTION_FILE}; the checkpoint is incomplete")
    read_header(path)
    if config.attention_sha256 and _sha256(path) != config.attention_sha256:
        raise UserError(f"{path} is corrupted (its sha256 differs from {CONFIG_FILE}); convert the model again")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise UserError(f"{path} is truncated or corrupted ({error}); convert the model again") from None


def load_attention_tensors(folder: Path, config: CheckpointConfig, components: dict[str, nn.Module]) -> None:
    """Copy the checkpoint's SLA2 parameters into the converted components; keys must match exactly."""
    stored = _read_attention_file(folder, config)
    expected = attention_tensors(components)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"{folder / ATTENTION_FILE} does not fit the model: {'; '.join(parts)}")
    for key, tensor in stored.items():
        if tensor.shape != expected[key].shape:
            raise UserError(
                f"{folder / ATTENTION_FILE}: {key} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for component, model in components.items():
            for module_name, layer in sla2_layers(model).items():
                prefix = f"{component}.{module_name}."
                state = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
                layer.load_state_dict(state, strict=True)


def _base_location(config: CheckpointConfig, folder: Path, *, offline: bool) -> ModelLocation:
    base = config.base
    if base.source == "hub":
        return locate(ModelSpec(kind="hub", repo_id=base.repo_id, revision=base.revision), offline=offline)
    if base.source == "local":
        path = Path(base.path)
        if not path.is_dir():
            raise UserError(
                f"the base model folder {path} recorded in {folder / CONFIG_FILE} no longer exists; "
                "restore it or convert again"
            )
        return ModelLocation(spec=ModelSpec(kind="local", path=path), root=path, offline=offline)
    return ModelLocation(spec=ModelSpec(kind="embedded"), root=None, offline=offline)


def _checkpoint_source(location: ModelLocation, config: CheckpointConfig, recipe: Recipe) -> ModelSource:
    """Where the base weights of a checkpoint come from: its own subfolders, or its base model record."""
    if config.base_weights == "referenced":
        return base_source(_base_location(config, location.root, offline=location.offline), recipe_name=recipe.name)
    root = location.fetch(weight_patterns(tuple(config.components)))
    components = {}
    for name in config.components:
        found = read_component(name, root / name)
        if found is None:
            raise UserError(f"{root} lacks the included base weights of {name} ({name}/config.json)")
        components[name] = found
    return ModelSource(recipe=recipe, base=config.base, components=components)


def open_checkpoint(
    location: ModelLocation,
    *,
    weights: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    sparsity: float | None = None,
    quant: str | None = None,
) -> tuple[dict[str, diffusers.ModelMixin], CheckpointConfig]:
    """Rebuild a checkpoint's converted components (skeletons when `weights` is False).

    `sparsity` and `quant` override the stored settings; None keeps them.
    """
    config = read_config(location.root)
    recipe = get_recipe(config.recipe)
    source = _checkpoint_source(location, config, recipe)
    components = build_components(source, weights=weights, dtype=dtype, device=device)
    for name, model in components.items():
        record = config.components.get(name)
        if record is None or record.model_class != type(model).__name__:
            raise UserError(
                f"{location.root / CONFIG_FILE} does not describe the {name} of its base model "
                f"({type(model).__name__}); convert the model again"
            )
        convert_component(
            model, recipe, component=name, base=config.base,
            sparsity=config.sparsity if sparsity is None else sparsity,
            block_q=config.block_q, block_k=config.block_k, modules=record.converted_modules,
            quant=config.quantization if quant is None else quant,
        )
    load_attention_tensors(location.root, config, components)
    return components, config


def open_converted(
    location: ModelLocation,
    *,
    weights: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    sparsity: float | None = None,
    quant: str | None = None,
    recipe: str | None = None,
) -> dict[str, diffusers.ModelMixin]:
    """Converted components from any location (skeletons when `weights` is False).

    An SLA2 checkpoint opens with its trained layers (`sparsity` and `quant` override its settings); a base
    model is converted now with its recipe's defaults (`recipe` names one, else it is found; `quant`
    default none). What `sla2cli.load` returns and what `sla2 convert` writes.
    """
    if location.holds_checkpoint():
        components, _ = open_checkpoint(
            location, weights=weights, dtype=dtype, device=device, sparsity=sparsity, quant=quant
        )
        return components
    source = base_source(location, recipe_name=recipe)
    components = build_components(source, weights=weights, dtype=dtype, device=device)
    convert_with_recipe(components, source.recipe, base=source.base, sparsity=sparsity, quant=quant or QUANT_NONE)
    return components
