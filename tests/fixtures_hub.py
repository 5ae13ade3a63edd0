"""Helpers for tests that need models on disk or on a (local, offline) Hugging Face Hub cache.

The cache is built in the layout huggingface_hub itself writes: `models--org--name/snapshots/<commit>/`
holding the files, and `refs/main` holding the commit. With HF_HUB_OFFLINE=1 the loading code finds it
exactly as it would find a real download.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from sla2cli.cli import main
from sla2cli.integration.recipes import Recipe
from sla2cli.sources.random_models import build_random_model, example_inputs, scaled_down_config


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub (in this process and in subprocesses) at `cache`, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def publish_to_hub_cache(
    cache: Path, repo_id: str, components: dict[str, torch.nn.Module], *, revision: str = "main"
) -> str:
    """Save `components` (name -> diffusers model) as repository `repo_id` in the cache; return the commit."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    index = {"_class_name": "Pipeline", "_diffusers_version": "0.0"}
    for name, model in components.items():
        model.save_pretrained(snapshot / name, safe_serialization=True)
        index[name] = ["diffusers", type(model).__name__]
    (snapshot / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / revision).write_text(commit, encoding="utf-8")
    return commit


def scaled_down_components(recipe: Recipe, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Random-weight, scaled-down models for each component of a recipe (different seeds per component)."""
    return {
        name: build_random_model(recipe.name, full_size=False, seed=seed + index)
        for index, name in enumerate(recipe.components)
    }


def small_inputs(recipe: Recipe, seed: int = 0) -> dict:
    """Forward inputs for a scaled-down model: 5 latent frames of 16 x 16 patches' worth (320+ tokens),
    enough for several key blocks, so 97% sparsity routes for real."""
    pixels = 16 * recipe.video.spatial_compression
    return example_inputs(recipe, (pixels, pixels), 17, config=scaled_down_config(recipe), seed=seed)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `sla2 ARGS` in this process; return (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *, mentions: str) -> None:
    """Exit code 2, one line saying `error: ...` that mentions `mentions`, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert re.search(mentions, lines[0]), lines[0]


def folder_listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sorted: to show that a failed command wrote nothing."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
