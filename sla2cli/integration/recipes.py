"""Recipes: what to convert in each supported model family, read from the json files under `recipes/`.

A recipe file holds facts about one published model: where it lives (Hub id, transformer subfolders),
which diffusers class builds it, which attention modules are self-attention (converted) and which stay
dense, block sizes, default sparsity, layers kept dense, the video geometry that turns a resolution into
a token count, defaults for calibration and fine-tuning, and the full-size architecture (the
transformer's config), so that the model can be built with random weights without downloading it.

Why data files: adding a fine-tune of a supported family is a new json file, not new code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from sla2cli.embedded.config import MODEL_KWARGS
from sla2cli.errors import UserError
from sla2cli.ops.validation import check_timestep

RECIPE_VERSION = 1
RECIPES_PACKAGE = "sla2cli.recipes"
EMBEDDED_SOURCE = "embedded"  # a recipe whose model ships with sla2 (no Hub id)
EMBEDDED_RECIPE = "embedded"  # the name of the embedded default model's recipe
SOURCES = ("hub", EMBEDDED_SOURCE)
PROCESSOR_KINDS = ("wan", "cogvideox")
REQUIRED_KEYS = (
    "recipe_version", "name", "title", "source", "hub_id", "model_class", "components", "attention",
    "block_q", "block_k", "sparsity", "dense_layers", "video", "resolutions", "default_resolution",
    "calibration", "finetune", "architecture",
)
LAYER_WILDCARD = "*"
# Wan image-to-video conditioning: the transformer's keyword for the image embeddings, and how many
# CLIP ViT-H/14 tokens they hold. Report inputs, fine-tuning data and random test inputs all use these.
IMAGE_ARGUMENT = "encoder_hidden_states_image"
IMAGE_TOKENS = 257


@dataclass(frozen=True)
class Resolution:
    """A clip size in pixels and frames (for the embedded model, in latent units)."""

    height: int
    width: int
    frames: int


@dataclass(frozen=True)
class VideoGeometry:
    """How a clip becomes a token sequence: VAE compression, patch size and text tokens."""

    temporal_compression: int
    spatial_compression: int
    patch: tuple[int, int, int]
    text_tokens: int
    text_in_self_attention: bool

    def latent_shape(self, resolution: Resolution) -> tuple[int, int, int]:
        """(frames, height, width) of the latent: causal VAE, first frame kept on its own."""
        frames = (resolution.frames - 1) // self.temporal_compression + 1
        return frames, resolution.height // self.spatial_compression, resolution.width // self.spatial_compression

    def video_tokens(self, resolution: Resolution) -> int:
        """Tokens the transformer makes of the clip's latent (one per patch)."""
        frames, height, width = self.latent_shape(resolution)
        patch_t, patch_h, patch_w = self.patch
        return (frames // patch_t) * (height // patch_h) * (width // patch_w)

    def self_attention_length(self, resolution: Resolution) -> int:
        """Sequence length of one self-attention call: video tokens, plus text where attention is joint."""
        text = self.text_tokens if self.text_in_self_attention else 0
        return self.video_tokens(resolution) + text


@dataclass(frozen=True)
class CalibrationDefaults:
    """Defaults of `sla2 calibrate` for a model family (the recipe's `calibration` block): how many clips and
    which noise levels the q, k, v are captured at, and how each layer's router and alpha are fitted."""

    clips: int
    timesteps: tuple[float, ...]
    router_steps: int
    router_learning_rate: float
    alpha_steps: int
    alpha_learning_rate: float
    tau: float


CALIBRATION_KEYS = (
    "clips", "timesteps", "router_steps", "router_learning_rate", "alpha_steps", "alpha_learning_rate", "tau",
)


def _parse_calibration(block: dict[str, Any], origin: str) -> CalibrationDefaults:
    """The `calibration` block, checked: exactly the known keys, sensible values."""
    if set(block) != set(CALIBRATION_KEYS):
        raise ValueError(f"recipe {origin}: calibration needs exactly the keys {', '.join(CALIBRATION_KEYS)}")
    timesteps = tuple(check_timestep(t, f"recipe {origin}: calibration.timesteps") for t in block["timesteps"])
    if not timesteps:
        raise ValueError(f"recipe {origin}: calibration.timesteps must list at least one value in [0, 1]")
    defaults = CalibrationDefaults(
        clips=int(block["clips"]),
        timesteps=timesteps,
        router_steps=int(block["router_steps"]),
        router_learning_rate=float(block["router_learning_rate"]),
        alpha_steps=int(block["alpha_steps"]),
        alpha_learning_rate=float(block["alpha_learning_rate"]),
        tau=float(block["tau"]),
    )
    if defaults.clips < 1 or min(defaults.router_steps, defaults.alpha_steps) < 0 or min(
        defaults.router_learning_rate, defaults.alpha_learning_rate, defaults.tau
    ) <= 0:
        raise ValueError(f"recipe {origin}: calibration needs clips >= 1, steps >= 0, positive rates and tau")
    return defaults


@dataclass(frozen=True)
class AttentionLayout:
    """Where the self-attention modules are: a dotted name with `*` standing for the layer index."""

    processor: str
    self_attention: str
    kept_dense: tuple[str, ...]
    note: str

    def layer_index(self, module_name: str) -> int | None:
        """The layer index if `module_name` is one of the self-attention modules, else None."""
        prefix, _, suffix = self.self_attention.partition(LAYER_WILDCARD)
        pattern = re.escape(prefix) + r"(\d+)" + re.escape(suffix)
        match = re.fullmatch(pattern, module_name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Recipe:
    """One supported model: read from `recipes/<name>.json`; see the module docstring for the fields."""

    name: str
    title: str
    source: str
    hub_id: str | None
    model_class: str
    components: tuple[str, ...]
    attention: AttentionLayout
    block_q: int
    block_k: int
    sparsity: float
    dense_layers: tuple[int, ...]
    video: VideoGeometry
    resolutions: dict[str, Resolution]
    default_resolution: str
    calibration: CalibrationDefaults
    finetune: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None
    notes: str = ""

    def resolution(self, name: str | None = None) -> Resolution:
        """A named resolution of this recipe (the default one when `name` is None)."""
        key = name or self.default_resolution
        if key not in self.resolutions:
            raise UserError(
                f"recipe {self.name} has no resolution {key!r}; use one of {', '.join(self.resolutions)}"
            )
        return self.resolutions[key]

    def default_tokens(self) -> int:
        """Self-attention sequence length at the default resolution."""
        return self.video.self_attention_length(self.resolution())

    def model_config(self) -> dict[str, Any] | None:
        """Constructor arguments of the full-size model: the recipe's architecture, or for the embedded
        model the ones its package defines (kept there, next to its weights, in one place)."""
        if self.source == EMBEDDED_SOURCE:
            return dict(MODEL_KWARGS)
        return dict(self.architecture) if self.architecture is not None else None


def _parse_recipe(data: dict[str, Any], origin: str) -> Recipe:
    """Check a recipe document and build the Recipe; a bad file is a packaging bug, reported by name."""
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"recipe {origin} lacks keys: {', '.join(missing)}")
    if data["recipe_version"] != RECIPE_VERSION:
        raise ValueError(f"recipe {origin} has version {data['recipe_version']}, expected {RECIPE_VERSION}")
    if data["source"] not in SOURCES:
        raise ValueError(f"recipe {origin}: source must be one of {SOURCES}")
    if data["source"] == "hub" and (not data["hub_id"] or data["architecture"] is None):
        raise ValueError(f"recipe {origin}: a hub recipe needs hub_id and architecture")
    attention = data["attention"]
    if attention["processor"] not in PROCESSOR_KINDS:
        raise ValueError(f"recipe {origin}: attention.processor must be one of {PROCESSOR_KINDS}")
    if attention["self_attention"].count(LAYER_WILDCARD) != 1:
        raise ValueError(f"recipe {origin}: attention.self_attention needs exactly one '*'")
    resolutions = {name: Resolution(**size) for name, size in data["resolutions"].items()}
    if data["default_resolution"] not in resolutions:
        raise ValueError(f"recipe {origin}: default_resolution is not among its resolutions")
    video = data["video"]
    return Recipe(
        name=data["name"],
        title=data["title"],
        source=data["source"],
        hub_id=data["hub_id"],
        model_class=data["model_class"],
        components=tuple(data["components"]),
        attention=AttentionLayout(
            processor=attention["processor"],
            self_attention=attention["self_attention"],
            kept_dense=tuple(attention.get("kept_dense", ())),
            note=attention.get("note", ""),
        ),
        block_q=int(data["block_q"]),
        block_k=int(data["block_k"]),
        sparsity=float(data["sparsity"]),
        dense_layers=tuple(int(layer) for layer in data["dense_layers"]),
        video=VideoGeometry(
            temporal_compression=int(video["temporal_compression"]),
            spatial_compression=int(video["spatial_compression"]),
            patch=tuple(int(p) for p in video["patch"]),
            text_tokens=int(video["text_tokens"]),
            text_in_self_attention=bool(video["text_in_self_attention"]),
        ),
        resolutions=resolutions,
        default_resolution=data["default_resolution"],
        calibration=_parse_calibration(data["calibration"], origin),
        finetune=dict(data["finetune"]),
        architecture=data["architecture"],
        notes=data.get("notes", ""),
    )


@cache
def all_recipes() -> dict[str, Recipe]:
    """Every shipped recipe by name, in file-name order (the order ties are broken in)."""
    files = sorted(
        (entry for entry in resources.files(RECIPES_PACKAGE).iterdir() if entry.name.endswith(".json")),
        key=lambda entry: entry.name,
    )
    recipes: dict[str, Recipe] = {}
    for entry in files:
        recipe = _parse_recipe(json.loads(entry.read_text(encoding="utf-8")), entry.name)
        if recipe.name in recipes:
            raise ValueError(f"two recipe files are named {recipe.name}")
        recipes[recipe.name] = recipe
    return recipes


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (case-insensitive), or a UserError listing the known ones."""
    recipes = all_recipes()
    by_lower = {key.lower(): recipe for key, recipe in recipes.items()}
    if name.lower() not in by_lower:
        raise UserError(f"unknown recipe {name!r}; known recipes: {', '.join(recipes)} (sla2 convert --list-recipes)")
    return by_lower[name.lower()]


def recipe_for_hub_id(hub_id: str) -> Recipe | None:
    """The recipe whose Hub id is `hub_id` (case-insensitive), if any."""
    for recipe in all_recipes().values():
        if recipe.hub_id and recipe.hub_id.lower() == hub_id.lower():
            return recipe
    return None


def supported_model_classes() -> tuple[str, ...]:
    """diffusers class names that some recipe converts."""
    return tuple(dict.fromkeys(recipe.model_class for recipe in all_recipes().values()))


ARCHITECTURE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels")


def recipe_for_architecture(model_class: str, config: dict[str, Any], available_components: set[str]) -> Recipe:
    """Pick the recipe for a model known only by its class and config (a local folder, an unknown id).

    Among recipes of the same class whose components are all present, prefer an exact match on the key
    sizes, then the most architecture fields in common (so an image-conditioned model gets an I2V
    recipe), then the most components (Wan2.2 A14B over Wan2.1 14B when both experts exist), then
    file-name order. An unsupported class is a UserError.
    """
    candidates = [
        recipe for recipe in all_recipes().values()
        if recipe.model_class == model_class and set(recipe.components) <= available_components
    ]
    if not candidates:
        supported = ", ".join(supported_model_classes())
        raise UserError(
            f"unsupported architecture {model_class}; sla2 converts {supported} (see sla2 convert --list-recipes)"
        )

    def score(recipe: Recipe) -> tuple[bool, int, int]:
        reference = recipe.model_config() or {}
        exact = bool(reference) and all(config.get(key) == reference.get(key) for key in ARCHITECTURE_KEYS)
        shared = sum(1 for key, value in reference.items() if _same(config.get(key), value))
        return exact, shared, len(recipe.components)

    return max(candidates, key=score)


def _same(a: Any, b: Any) -> bool:
    """Config equality that ignores list/tuple differences (json has no tuples)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
