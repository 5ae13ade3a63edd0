"""The SLA2 checkpoint format: file names and the `sla2_config.json` schema, read strictly.

A checkpoint folder holds:

- `sla2_config.json`: schema version, sla2 version, recipe, base model (Hub id + commit, a folder, or the
  embedded model), whether base weights are referenced or included, per component the model class and
  the converted module names, sparsity, block sizes, quantisation mode, the sha256 of the attention file,
  and measurements (optional, filled by later commands).
- `sla2_attention.safetensors`: router and alpha parameters of every converted layer, keyed
  `<component>.<module>.<parameter>` (e.g. `transformer.blocks.0.attn1.proj_q`), float32.
- `README.md`: the model card.
- `<component>/`: base weights in diffusers layout (sharded safetensors), only once fine-tuning has
  changed them ("base_weights": "included").
- `finetune_state/` and `finetune_metrics.csv`: in the output of `sla2 finetune` only, what `--resume` needs
  and the run's losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sla2cli.errors import UserError
from sla2cli.ops.quantization import LEGACY_QUANT_NAMES, REQUESTABLE_QUANT_MODES
from sla2cli.ops.validation import check_sparsity
from sla2cli.sources.base import BaseModelRef

SCHEMA_VERSION = 1
CONFIG_FILE = "sla2_config.json"
ATTENTION_FILE = "sla2_attention.safetensors"
CARD_FILE = "README.md"
CHECKPOINT_FILES = (CONFIG_FILE, ATTENTION_FILE, CARD_FILE)  # every checkpoint has these; base weights aside
TRAINING_STATE_DIR = "finetune_state"  # a fine-tuning run's optimizer, RNG and position (for --resume)
TRAINING_METRICS_FILE = "finetune_metrics.csv"  # a fine-tuning run's losses, one row per step or validation
TRAINING_ENTRIES = (TRAINING_STATE_DIR, TRAINING_METRICS_FILE)  # what `sla2 finetune` adds to its checkpoints
BASE_WEIGHT_MODES = ("referenced", "included")
QUANTIZATION_MODES = REQUESTABLE_QUANT_MODES  # `auto` is resolved when the model runs, per GPU
REQUIRED_KEYS = (
    "schema_version", "sla2_version", "recipe", "base_model", "base_weights", "components",
    "sparsity", "block_q", "block_k", "quantization",
)


@dataclass(frozen=True)
class ComponentRecord:
    """One converted model of the checkpoint (e.g. `transformer`): its class and converted modules."""

    model_class: str
    converted_modules: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointConfig:
    """The parsed `sla2_config.json`."""

    sla2_version: str
    recipe: str
    base: BaseModelRef
    base_weights: str
    components: dict[str, ComponentRecord]
    sparsity: float
    block_q: int
    block_k: int
    quantization: str = "none"
    attention_sha256: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "sla2_version": self.sla2_version,
            "recipe": self.recipe,
            "base_model": self.base.to_json(),
            "base_weights": self.base_weights,
            "components": {
                name: {"model_class": record.model_class, "converted_modules": list(record.converted_modules)}
                for name, record in self.components.items()
            },
            "sparsity": self.sparsity,
            "block_q": self.block_q,
            "block_k": self.block_k,
            "quantization": self.quantization,
            "attention_sha256": self.attention_sha256,
            "measurements": self.measurements,
        }


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid SLA2 config: {why}; convert the model again")


def _parse_components(path: Path, data: Any) -> dict[str, ComponentRecord]:
    if not isinstance(data, dict) or not data:
        raise _bad(path, "components must be a non-empty object")
    records = {}
    for name, entry in data.items():
        modules = entry.get("converted_modules") if isinstance(entry, dict) else None
        model_class = entry.get("model_class") if isinstance(entry, dict) else None
        if not isinstance(model_class, str) or not isinstance(modules, list) or not modules:
            raise _bad(path, f"component {name} needs model_class and a non-empty converted_modules list")
        if not all(isinstance(module, str) for module in modules):
            raise _bad(path, f"component {name} lists a module name that is not a string")
        records[name] = ComponentRecord(model_class=model_class, converted_modules=tuple(modules))
    return records


def parse_config(data: Any, path: Path) -> CheckpointConfig:
    """Validate a loaded sla2_config.json document; every problem is a UserError naming the file."""
    if not isinstance(data, dict):
        raise _bad(path, "not a json object")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {version}, newer than this sla2 reads ({SCHEMA_VERSION}); upgrade sla2"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise _bad(path, f"missing keys {', '.join(missing)}")
    if version != SCHEMA_VERSION:
        raise _bad(path, f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
    if data["base_weights"] not in BASE_WEIGHT_MODES:
        raise _bad(path, f"base_weights must be one of {BASE_WEIGHT_MODES}")
    quantization = data["quantization"]
    if isinstance(quantization, str):
        quantization = LEGACY_QUANT_NAMES.get(quantization, quantization)
    if quantization not in QUANTIZATION_MODES:
        raise _bad(path, f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_MODES)}")
    try:
        sparsity = check_sparsity(data["sparsity"])
    except ValueError as error:
        raise _bad(path, str(error)) from None
    for key in ("block_q", "block_k"):
        if isinstance(data[key], bool) or not isinstance(data[key], int):
            raise _bad(path, f"{key} must be an integer")
    try:
        base = BaseModelRef.from_json(data["base_model"])
    except ValueError as error:
        raise _bad(path, str(error)) from None
    if data["base_weights"] == "referenced" and not base.referencable:
        raise _bad(path, "its base weights are neither included nor referenced by Hub id or folder")
    return CheckpointConfig(
        schema_version=version,
        sla2_version=str(data["sla2_version"]),
        recipe=str(data["recipe"]),
        base=base,
        base_weights=data["base_weights"],
        components=_parse_components(path, data["components"]),
        sparsity=float(sparsity),
        block_q=data["block_q"],
        block_k=data["block_k"],
        quantization=quantization,
        attention_sha256=data.get("attention_sha256"),
        measurements=dict(data.get("measurements") or {}),
    )


def read_config(folder: Path) -> CheckpointConfig:
    """Read and validate `<folder>/sla2_config.json`."""
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no {CONFIG_FILE}; it is not an SLA2 checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not readable json") from None
    return parse_config(data, path)
