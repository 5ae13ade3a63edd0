"""What a model folder holds: diffusers components (subfolders with a config.json) or an SLA2 checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sla2cli.checkpoint.format import CONFIG_FILE as SLA2_CONFIG_FILE
from sla2cli.errors import UserError

CONFIG = "config.json"
SINGLE_COMPONENT = "transformer"


@dataclass(frozen=True)
class Component:
    """One diffusers model inside a folder: its subfolder name, location, class and config."""

    name: str
    path: Path
    class_name: str
    config: dict[str, Any]


@dataclass(frozen=True)
class FolderContents:
    """Components found in a folder, by name; `is_checkpoint` when it is an SLA2 checkpoint."""

    root: Path
    components: dict[str, Component] = field(default_factory=dict)
    is_checkpoint: bool = False


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A json object from `path`, or a UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {what} {path}: {error.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a json object")
    return data


def read_component(name: str, folder: Path) -> Component | None:
    """The diffusers model in `folder`, if its config.json names a class."""
    config_path = folder / CONFIG
    if not config_path.is_file():
        return None
    config = read_json(config_path, "model config")
    class_name = config.get("_class_name")
    if not isinstance(class_name, str):
        return None
    return Component(name=name, path=folder, class_name=class_name, config=config)


def inspect_folder(root: Path) -> FolderContents:
    """List the components of a pipeline folder, a single-model folder or an SLA2 checkpoint.

    A folder with its own config.json is one component, called `transformer`. Otherwise every
    subfolder whose config.json names a diffusers class is a component (vae, transformer, ...).
    """
    if (root / SLA2_CONFIG_FILE).is_file():
        return FolderContents(root=root, is_checkpoint=True)
    single = read_component(SINGLE_COMPONENT, root)
    if single is not None:
        return FolderContents(root=root, components={SINGLE_COMPONENT: single})
    components = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = read_component(sub.name, sub)
        if found is not None:
            components[sub.name] = found
    if not components:
        raise UserError(
            f"{root} is not a diffusers model folder (no config.json naming a model class, "
            "no component subfolders); pass a Hub id or a folder written by save_pretrained"
        )
    return FolderContents(root=root, components=components)
