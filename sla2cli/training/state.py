"""The training state kept inside an output checkpoint, so that `--resume` continues exactly.

    DIR/finetune_state/state.json            step, settings, what model and data it trains, validation
                                             figures of the start, the optimizer's non-tensor state
    DIR/finetune_state/optimizer.safetensors AdamW moments and step counts, keyed `<parameter>:<name>`
    DIR/finetune_state/rng.safetensors       each process's CPU (and CUDA) random state
    DIR/finetune_metrics.csv                 the loss history (see `metrics`)

The weights are the checkpoint's own. Everything is safetensors or json: no pickle. Samples are drawn
from (seed, global index), so the step is the data position; it is recorded anyway as samples seen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sla2cli.checkpoint.format import TRAINING_STATE_DIR
from sla2cli.errors import UserError
from sla2cli.sources.safetensors_check import read_header

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = "sla2-finetune-state"
STATE_VERSION = 1
KEY_SEPARATOR = ":"


@dataclass(frozen=True)
class RunRecord:
    """What a saved state describes: how far the run got and what it trains with."""

    step: int
    samples_seen: int
    settings: dict[str, Any]
    source: dict[str, Any]  # the model fine-tuned (its checkpoint config's identity)
    data: dict[str, Any]  # the data's fingerprint
    world_size: int
    validation_before: float
    dense_validation: float


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state dict (keyed by parameter name) as tensors and a json-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{KEY_SEPARATOR}{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of optimizer_to_files."""
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in rest["scalars"].items()}
    for key, value in tensors.items():
        name, _, entry = key.rpartition(KEY_SEPARATOR)
        state.setdefault(name, {})[entry] = value
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else dict(group)
              for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generator states (nothing in the loop draws from them, but modules may)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def write_state(
    folder: Path, record: RunRecord, optimizer_state: dict[str, Any], rng_by_rank: list[dict[str, torch.Tensor]]
) -> None:
    """The state files into `folder/finetune_state/` (the caller publishes `folder` atomically)."""
    target = folder / TRAINING_STATE_DIR
    target.mkdir(parents=True, exist_ok=True)
    tensors, rest = optimizer_to_files(optimizer_state)
    save_file(tensors, str(target / OPTIMIZER_FILE), metadata={"format": STATE_FORMAT})
    rng = {f"{kind}.rank{rank}": value for rank, states in enumerate(rng_by_rank) for kind, value in states.items()}
    save_file(rng, str(target / RNG_FILE), metadata={"format": STATE_FORMAT})
    document = {"format": STATE_FORMAT, "version": STATE_VERSION, **asdict(record), "optimizer": rest}
    (target / STATE_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _incomplete(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; the fine-tuning state is damaged, start again without --resume")


def read_record(out: Path) -> tuple[RunRecord, dict[str, Any]]:
    """The run record and the optimizer's json part of a saved state (tensors are read separately)."""
    path = out / TRAINING_STATE_DIR / STATE_FILE
    if not path.is_file():
        raise UserError(f"{out} holds no fine-tuning state to resume ({TRAINING_STATE_DIR}/{STATE_FILE}); "
                        "run without --resume to start a new fine-tuning")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != STATE_FORMAT or document.get("version") != STATE_VERSION:
            raise _incomplete(path, f"not a version {STATE_VERSION} {STATE_FORMAT} file")
        record = RunRecord(**{key: document[key] for key in RunRecord.__dataclass_fields__})
        return record, document["optimizer"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise _incomplete(path, "not readable") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _incomplete(path, "missing")
    read_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise _incomplete(path, str(error)) from None


def read_optimizer_state(out: Path, rest: dict[str, Any]) -> dict[str, Any]:
    """The full optimizer state dict saved in `out`."""
    return optimizer_from_files(_load_tensors(out / TRAINING_STATE_DIR / OPTIMIZER_FILE), rest)


def read_rng_states(out: Path, rank: int) -> dict[str, torch.Tensor]:
    """Process `rank`'s saved random states (empty when that rank did not exist in the saved run)."""
    suffix = f".rank{rank}"
    tensors = _load_tensors(out / TRAINING_STATE_DIR / RNG_FILE)
    return {key[: -len(suffix)]: value for key, value in tensors.items() if key.endswith(suffix)}
