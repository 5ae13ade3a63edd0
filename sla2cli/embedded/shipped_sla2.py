"""The embedded model's shipped SLA2 weights: calibrated and fine-tuned at one sparsity by the quality suite.

Three files beside the dense model's in the assets folder; `sla2 convert` without MODEL builds its
checkpoint from them, and falls back to the untrained conversion of the dense model when any is missing:

- `embedded_wan_sla2.safetensors`: the fine-tuned base weights in bfloat16 (float32 for the modules
  diffusers keeps in float32: norms, time embedding, modulation tables), about half of float32's size;
- `embedded_wan_sla2_attention.safetensors`: the SLA2 parameters (router, alpha predictor) in float32,
  keyed `<module>.<parameter>`;
- `embedded_wan_sla2.json`: architecture, sparsity and block sizes, and `measurements`: how the weights
  were made and what the suite measured on exactly this rounded form (what users load).

`write_shipped_sla2` and `load_shipped_sla2` are the only writer and reader of the format, so the suite
evaluates the model through the same loader that `sla2 convert` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sla2cli.checkpoint.storage import split_state
from sla2cli.embedded.config import ASSETS_DIR
from sla2cli.embedded.loading import build_embedded_model, keep_precision_sensitive_parts_fp32
from sla2cli.errors import UserError
from sla2cli.files import atomic_path, write_json_file
from sla2cli.integration.conversion import convert_embedded, model_settings, sla2_layers
from sla2cli.ops.quantization import QUANT_NONE

SHIPPED_WEIGHTS_FILENAME = "embedded_wan_sla2.safetensors"
SHIPPED_ATTENTION_FILENAME = "embedded_wan_sla2_attention.safetensors"
SHIPPED_RECORD_FILENAME = "embedded_wan_sla2.json"
SHIPPED_FILENAMES = (SHIPPED_WEIGHTS_FILENAME, SHIPPED_ATTENTION_FILENAME, SHIPPED_RECORD_FILENAME)
SHIPPED_FORMAT = "sla2-embedded-shipped"
SHIPPED_FORMAT_VERSION = 1
SHIPPED_DTYPE = torch.bfloat16


def shipped_dir(assets_dir: Path | str | None = None) -> Path:
    """The folder the shipped files are read from (the package's assets unless given)."""
    return Path(assets_dir) if assets_dir is not None else ASSETS_DIR


def shipped_sla2_record(assets_dir: Path | str | None = None) -> dict[str, Any] | None:
    """The shipped record (json) when all three files are present, else None: the package then has no
    trained SLA2 weights and `sla2 convert` gives the untrained conversion."""
    folder = shipped_dir(assets_dir)
    if not all((folder / name).is_file() for name in SHIPPED_FILENAMES):
        return None
    try:
        record = json.loads((folder / SHIPPED_RECORD_FILENAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{folder / SHIPPED_RECORD_FILENAME} is unreadable ({error}); reinstall sla2") from None
    if not isinstance(record, dict) or record.get("format") != SHIPPED_FORMAT:
        raise UserError(f"{folder / SHIPPED_RECORD_FILENAME} is not a shipped SLA2 record; reinstall sla2")
    return record


def _keeps_fp32(model: nn.Module, name: str) -> bool:
    return any(pattern in name for pattern in (getattr(model, "_keep_in_fp32_modules", None) or ()))


def shipped_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's base weights as they ship: bfloat16, except what diffusers keeps in float32."""
    base, _ = split_state(model, model.state_dict())
    return {
        name: value.detach().to("cpu", torch.float32 if _keeps_fp32(model, name) else SHIPPED_DTYPE).contiguous()
        if value.is_floating_point() else value.detach().to("cpu").contiguous()
        for name, value in base.items()
    }


def write_shipped_sla2(model: nn.Module, folder: Path, measurements: dict[str, Any]) -> dict[str, Any]:
    """Write a converted embedded model (plain SLA2 layers) as the three shipped files; returns the record.

    Each file is written under a temporary name and renamed; the record goes last, so a folder with a
    half-finished write has no record and reads as "nothing shipped".
    """
    sparsity, block_q, block_k = model_settings(model)
    _, attention = split_state(model, model.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SHIPPED_RECORD_FILENAME).unlink(missing_ok=True)
    with atomic_path(folder / SHIPPED_WEIGHTS_FILENAME) as temporary:
        save_file(shipped_base_weights(model), str(temporary), metadata={"format": "pt"})
    with atomic_path(folder / SHIPPED_ATTENTION_FILENAME) as temporary:
        tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in attention.items()}
        save_file(tensors, str(temporary), metadata={"format": "sla2"})
    record = {
        "format": SHIPPED_FORMAT,
        "version": SHIPPED_FORMAT_VERSION,
        "model": {key: list(value) if isinstance(value, tuple) else value for key, value in model.config.items()
                  if not key.startswith("_")},
        "sparsity": sparsity,
        "block_q": block_q,
        "block_k": block_k,
        "base_dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
        "measurements": dict(measurements),
    }
    write_json_file(folder / SHIPPED_RECORD_FILENAME, record, sort_keys=True)
    return record


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path} is truncated or corrupted ({error}); reinstall sla2") from None


def _load_attention(model: nn.Module, path: Path) -> None:
    """Copy the shipped SLA2 parameters into the converted layers; keys must match exactly."""
    stored = _read_tensors(path)
    with torch.no_grad():
        for module, layer in sla2_layers(model).items():
            prefix = f"{module}."
            state = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
            try:
                layer.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise UserError(f"{path} does not fit {module} ({str(error).splitlines()[0]}); reinstall sla2") \
                    from None
            for key in state:
                stored.pop(prefix + key)
    if stored:
        raise UserError(f"{path} holds parameters of layers the model lacks (e.g. {next(iter(stored))}); "
                        "reinstall sla2")


def load_shipped_sla2(
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quant: str = QUANT_NONE,
    assets_dir: Path | str | None = None,
) -> nn.Module:
    """The shipped SLA2 model: the embedded architecture with the shipped (rounded) base weights, converted
    at the shipped sparsity and block sizes, with the shipped router and alpha; eval mode, no grad."""
    folder = shipped_dir(assets_dir)
    record = shipped_sla2_record(folder)
    if record is None:
        raise UserError(f"{folder} holds no shipped SLA2 weights; convert with --untrained")
    model = build_embedded_model({"model": record["model"]})
    weights = {key: value.float() if value.is_floating_point() else value
               for key, value in _read_tensors(folder / SHIPPED_WEIGHTS_FILENAME).items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise UserError(f"{folder / SHIPPED_WEIGHTS_FILENAME} does not fit the embedded model "
                        f"({str(error).splitlines()[0]}); reinstall sla2") from None
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
        keep_precision_sensitive_parts_fp32(model)
    convert_embedded(
        model, sparsity=float(record["sparsity"]), block_q=int(record["block_q"]), block_k=int(record["block_k"]),
        quant=quant,
    )
    _load_attention(model, folder / SHIPPED_ATTENTION_FILENAME)
    return model.eval().requires_grad_(False)


def add_shipped_measurements(folder: Path, measurements: dict[str, Any]) -> dict[str, Any]:
    """Add figures measured after the write (the rounded form's validation, the dense references) to the
    record; returns the updated record."""
    record = shipped_sla2_record(folder)
    if record is None:
        raise UserError(f"{folder} holds no shipped SLA2 weights to add measurements to")
    record["measurements"] = {**record["measurements"], **measurements}
    write_json_file(folder / SHIPPED_RECORD_FILENAME, record, sort_keys=True)
    return record
