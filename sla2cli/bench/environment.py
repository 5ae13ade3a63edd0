"""Where the numbers come from: device, driver and library versions, sla2's version and, when sla2 runs
from a git checkout, its commit.

Every row carries these, so a CSV or JSON file on its own says which machine and code produced it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sla2cli.version import __version__

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
    git_commit: str | None  # None unless sla2 runs from a git checkout (or SLA2_COMMIT names one)

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    """The first line a command prints, or None when it fails or prints nothing.

    Git's own variables (GIT_DIR, GIT_WORK_TREE, ...) are dropped: they would point git at whatever
    repository the caller is working in instead of the folder given as cwd.
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    try:
        done = subprocess.run(
            command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def git_commit(package_dir: Path | None = None) -> str | None:
    """The commit of the sla2 code that runs: SLA2_COMMIT when set (a copied tree without .git), else the
    HEAD of the git checkout sla2 runs from, else None.

    A checkout counts only when the package folder (`sla2cli/`) sits at the top of a git work tree that
    tracks it. An installed copy inside some other repository (a virtual environment in a project
    folder) and the repository of the current folder are not sla2's, so their commits are never used.
    """
    if os.environ.get("SLA2_COMMIT"):
        return os.environ["SLA2_COMMIT"]
    package = (package_dir or Path(__file__).resolve().parents[1]).resolve()
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=package)
    if top is None or Path(top).resolve() != package.parent:
        return None
    if _run(["git", "ls-files", "--error-unmatch", f"{package.name}/__init__.py"], cwd=package.parent) is None:
        return None
    return _run(["git", "rev-parse", "HEAD"], cwd=package.parent)


def gpu_driver() -> str:
    return _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or UNKNOWN


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
        sla2_version=__version__,
        git_commit=git_commit(),
    )
