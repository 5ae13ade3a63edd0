"""Build a recipe's diffusers model: from its config alone (no weights), or with safetensors weights.

Only classes named by a recipe are ever instantiated, and only through diffusers' own class (no
trust_remote_code, no custom code from the Hub); weights load with use_safetensors=True.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from torch import nn
from torch.distributed.fsdp import FSDPModule

from sla2cli.errors import UserError
from sla2cli.integration.recipes import supported_model_classes
from sla2cli.sources.safetensors_check import check_weight_folder


def model_class(class_name: str) -> type[diffusers.ModelMixin]:
    """The diffusers class for a supported class name; anything else is an unsupported architecture."""
    supported = supported_model_classes()
    if class_name not in supported:
        raise UserError(
            f"unsupported architecture {class_name}; sla2 converts {', '.join(supported)} "
            "(see sla2 convert --list-recipes)"
        )
    return getattr(diffusers, class_name)


def model_class_name(model: nn.Module) -> str:
    """The model's own class name, also when FSDP2 has wrapped its class in place (as FSDP<Name>)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json minus diffusers' bookkeeping keys (those starting with an underscore)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def build_skeleton(class_name: str, config: dict[str, Any]) -> diffusers.ModelMixin:
    """The model's module tree with parameters on the meta device: enough to find and convert its
    attention layers without reading (or holding) gigabytes of weights."""
    cls = model_class(class_name)
    with init_empty_weights():
        return cls.from_config(model_kwargs(config))


def load_weights(
    folder: Path, class_name: str, dtype: torch.dtype, device: torch.device | str
) -> diffusers.ModelMixin:
    """The model from a diffusers component folder (config.json + safetensors), in eval mode."""
    cls = model_class(class_name)
    check_weight_folder(folder)
    try:
        model = cls.from_pretrained(
            folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load the {class_name} weights in {folder}: {first_line}") from None
    return model.to(device).eval()
