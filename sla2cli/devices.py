"""Where and in which precision models run: the one reading of `--device` and `--dtype` for every command.

A model runs in bfloat16 on a GPU (what the video models are trained and served in) and in float32 on a
CPU (where bfloat16 matrix products are slow and the Triton interpreter is inexact in it).
"""

from __future__ import annotations

import torch

from sla2cli.errors import UserError

DEVICE_CHOICES = ("auto", "cuda", "cpu")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto`: CUDA when a GPU is visible, else CPU; `cuda` where there is none is a UserError."""
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_type = text.split(":", 1)[0]
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"--device {text!r} is unknown; use {', '.join(DEVICE_CHOICES)}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text}: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(text)


def model_dtype(device: torch.device | str, dtype: torch.dtype | None = None) -> torch.dtype:
    """`dtype` if given, else the precision models run in on `device` (bfloat16 on CUDA, float32 elsewhere)."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto (the device's model precision) or one of DTYPES."""
    if name == "auto":
        return model_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def out_of_memory_error(device: torch.device, advice: str) -> UserError:
    """One line for a run that ran out of GPU memory: how full the device got, then what to change."""
    if device.type != "cuda":
        return UserError(f"out of memory on {device}: {advice}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return UserError(f"out of GPU memory on {device} (peak {peak:.1f} of {total:.1f} GiB allocated): {advice}")
