"""From a MODEL argument to the recipe, the base-model record and the component folders to build from.

This is the loading path shared by `sla2 convert`, `sla2cli.load` and the checkpoint loader: Hub ids
are fetched in two steps (the small json files first, to learn what the repository holds, then only
the safetensors of the components the recipe converts), local folders are read in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch

from sla2cli.checkpoint.format import CHECKPOINT_FILES
from sla2cli.embedded.loading import load_embedded_model
from sla2cli.errors import UserError
from sla2cli.integration.recipes import EMBEDDED_RECIPE, Recipe, get_recipe, recipe_for_architecture, recipe_for_hub_id
from sla2cli.sources.base import BaseModelRef
from sla2cli.sources.components import build_skeleton, load_weights
from sla2cli.sources.folders import Component, FolderContents, inspect_folder
from sla2cli.sources.hub import HubRepoUnavailable, commit_of, config_patterns, fetch_snapshot, weight_patterns
from sla2cli.sources.safetensors_check import check_weight_folder
from sla2cli.sources.spec import ModelSpec


@dataclass(frozen=True)
class ModelLocation:
    """A folder holding a model's files; for a Hub id, the cache snapshot of one pinned commit."""

    spec: ModelSpec
    root: Path | None
    offline: bool = False

    def fetch(self, patterns: list[str]) -> Path:
        """Make sure the files matching `patterns` are present (downloading from the same commit)."""
        if self.spec.kind == "hub":
            return fetch_snapshot(self.spec.repo_id, commit_of(self.root), patterns, offline=self.offline)
        return self.root

    def contents(self) -> FolderContents:
        return inspect_folder(self.root)

    def holds_checkpoint(self) -> bool:
        """True for an SLA2 checkpoint (folder or Hub snapshot); False for a base model or the embedded one."""
        return self.root is not None and self.contents().is_checkpoint

    def base_ref(self) -> BaseModelRef:
        if self.spec.kind == "hub":
            return BaseModelRef(source="hub", repo_id=self.spec.repo_id, revision=commit_of(self.root))
        if self.spec.kind == "local":
            return BaseModelRef(source="local", path=str(self.root))
        return BaseModelRef(source="embedded")


@dataclass(frozen=True)
class ModelSource:
    """A base model ready to build: its recipe, its record, and (except embedded) its component folders."""

    recipe: Recipe
    base: BaseModelRef
    components: dict[str, Component] = field(default_factory=dict)


def locate(spec: ModelSpec, *, offline: bool) -> ModelLocation:
    """Find the model's folder; for a Hub id this downloads only the json files that describe it."""
    if spec.kind == "embedded":
        return ModelLocation(spec=spec, root=None, offline=offline)
    if spec.kind == "local":
        return ModelLocation(spec=spec, root=spec.path, offline=offline)
    try:
        snapshot = fetch_snapshot(
            spec.repo_id, spec.revision, config_patterns() + list(CHECKPOINT_FILES), offline=offline
        )
    except HubRepoUnavailable as error:
        if spec.missing_folder is None:
            raise
        raise UserError(f"no such folder {spec.missing_folder}, and as a Hub id: {error}") from None
    return ModelLocation(spec=spec, root=snapshot, offline=offline)


def choose_recipe(contents: FolderContents, recipe_name: str | None, repo_id: str | None) -> Recipe:
    """The recipe for a folder's components: named by the user, known by Hub id, or by architecture."""
    recipe = get_recipe(recipe_name) if recipe_name else (recipe_for_hub_id(repo_id) if repo_id else None)
    if recipe is None:
        main = contents.components.get("transformer") or next(iter(contents.components.values()))
        return recipe_for_architecture(main.class_name, main.config, set(contents.components))
    if recipe.source == EMBEDDED_RECIPE:
        raise UserError(f"recipe {recipe.name} is for the embedded model; run without MODEL to use it")
    missing = [name for name in recipe.components if name not in contents.components]
    if missing:
        raise UserError(
            f"{contents.root} lacks {', '.join(missing)}, which recipe {recipe.name} converts "
            f"(found: {', '.join(contents.components) or 'nothing'})"
        )
    for name in recipe.components:
        found = contents.components[name].class_name
        if found != recipe.model_class:
            raise UserError(
                f"{name} in {contents.root} is a {found}, but recipe {recipe.name} expects {recipe.model_class}"
            )
    return recipe


def base_source(location: ModelLocation, *, recipe_name: str | None = None) -> ModelSource:
    """Pick the recipe and make the converted components' weights present and intact."""
    if location.spec.kind == "embedded":
        if recipe_name and get_recipe(recipe_name).name != EMBEDDED_RECIPE:
            raise UserError(f"the embedded model uses recipe {EMBEDDED_RECIPE}; pass MODEL to use {recipe_name}")
        return ModelSource(recipe=get_recipe(EMBEDDED_RECIPE), base=location.base_ref())
    contents = location.contents()
    if contents.is_checkpoint:
        raise UserError(f"{location.spec.describe()} is an SLA2 checkpoint, not a base model")
    recipe = choose_recipe(contents, recipe_name, location.spec.repo_id)
    subfolders = tuple(
        "" if contents.components[name].path == contents.root else name for name in recipe.components
    )
    root = location.fetch(weight_patterns(subfolders))
    components = {name: inspect_folder(root).components[name] for name in recipe.components}
    for component in components.values():
        check_weight_folder(component.path)
    return ModelSource(recipe=recipe, base=location.base_ref(), components=components)


def build_components(
    source: ModelSource, *, weights: bool, dtype: torch.dtype, device: torch.device | str
) -> dict[str, diffusers.ModelMixin]:
    """The source's models by component name: with weights, or as skeletons (meta tensors) when
    only the module tree is needed. The embedded model is small and always loads its weights: the
    shipped ones, or the component folders when a checkpoint includes its own (fine-tuned) weights."""
    if source.recipe.source == EMBEDDED_RECIPE and not source.components:
        return {name: load_embedded_model(dtype=dtype, device=device) for name in source.recipe.components}
    if not weights:
        return {name: build_skeleton(c.class_name, c.config) for name, c in source.components.items()}
    return {name: load_weights(c.path, c.class_name, dtype, device) for name, c in source.components.items()}
