"""Fine-tuning metrics: one row per training step or validation, written as `finetune_metrics.csv`.

Columns (snake_case): step (optimizer steps done), kind (train, validation, dense_validation), loss,
learning_rate, grad_norm, samples_per_second, elapsed_seconds, peak_memory_mb. Validation rows leave
the training-only columns empty. Floats are written with repr, so a value read back is bit-identical.
"""

from __future__ import annotations

import csv
import resource
import sys
from pathlib import Path
from typing import Any

import torch

COLUMNS = (
    "step", "kind", "loss", "learning_rate", "grad_norm", "samples_per_second", "elapsed_seconds", "peak_memory_mb",
)
TRAIN, VALIDATION, DENSE_VALIDATION = "train", "validation", "dense_validation"
Row = dict[str, Any]


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on `device`, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def validation_row(step: int, loss: float, kind: str = VALIDATION) -> Row:
    return {"step": step, "kind": kind, "loss": loss}


def train_losses(rows: list[Row]) -> list[float]:
    """The training loss of every step, in order."""
    return [row["loss"] for row in rows if row["kind"] == TRAIN]


def validations(rows: list[Row]) -> list[tuple[int, float]]:
    """(step, validation loss) of every validation of the fine-tuned model, in order."""
    return [(row["step"], row["loss"]) for row in rows if row["kind"] == VALIDATION]


def write_metrics_csv(rows: list[Row], path: Path) -> None:
    """All rows, missing columns empty."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: repr(value) if isinstance(value, float) else value for key, value in row.items()})


def read_metrics_csv(path: Path) -> list[Row]:
    """Rows as written: numbers back as int/float, empty cells dropped."""
    rows = []
    with path.open(newline="", encoding="utf-8") as stream:
        for record in csv.DictReader(stream):
            row: Row = {}
            for key, text in record.items():
                if text == "":
                    continue
                row[key] = text if key == "kind" else (int(text) if key == "step" else float(text))
            rows.append(row)
    return rows
