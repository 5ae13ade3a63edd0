"""Where the numbers come from: device, driver and library versions, and the code's git commit.

Every row carries these, so a CSV or JSON file on its own says which machine and code produced it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sla2cli

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Environment:
    device: str  # "cuda" or "cpu"
    gpu: str
    driver: str
    torch_version: str
    cuda_version: str
    triton_version: str
    sla2_version: str
    git_commit: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _run(command: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else UNKNOWN


def git_commit() -> str:
    """SLA2_COMMIT when set (a copied tree without .git), else the commit of the checkout sla2 runs
    from (editable installs), else 'unknown'."""
    if os.environ.get("SLA2_COMMIT"):
        return os.environ["SLA2_COMMIT"]
    return _run(["git", "rev-parse", "HEAD"], cwd=Path(sla2cli.__file__).resolve().parent)


def gpu_driver() -> str:
    return _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return getattr(triton, "__version__", UNKNOWN)


def describe(device: torch.device) -> Environment:
    on_gpu = device.type == "cuda"
    return Environment(
        device=device.type,
        gpu=torch.cuda.get_device_name(device) if on_gpu else "none (CPU)",
        driver=gpu_driver() if on_gpu else "none",
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda or "none",
        triton_version=triton_version(),
        sla2_version=sla2cli.__version__,
        git_commit=git_commit(),
    )
