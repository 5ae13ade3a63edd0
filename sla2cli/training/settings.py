"""Fine-tuning settings: their defaults come from the model's recipe (`finetune` block), options override.

Batch size is global: the samples of one optimizer step, over every process and accumulation step,
so that the same command trains the same way on one GPU or on eight (each sample's randomness
depends only on its global index; see `seeding`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from sla2cli.errors import UserError
from sla2cli.integration.recipes import Recipe
from sla2cli.ops.quantization import REQUESTABLE_QUANT_MODES
from sla2cli.ops.validation import check_positive_number, is_positive_number
from sla2cli.training.objectives import OBJECTIVES
from sla2cli.training.schedule import SCHEDULES

Clip = tuple[int, int, int]


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run depends on (the model and data aside)."""

    steps: int
    learning_rate: float
    batch_size: int
    grad_accum: int = 1
    objective: str = "flow"
    quant: str | None = None  # None keeps the model's own mode
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    shift: float = 1.0
    gradient_checkpointing: bool = False
    sla2_learning_rate: float | None = None
    validation_samples: int = 8
    validate_every: int = 0  # 0: at the start and the end only
    save_every: int = 0  # 0: at the end (and when interrupted) only
    seed: int = 0
    clip: Clip | None = None  # procedural clips (embedded model): latent frames, height, width

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["clip"] = list(self.clip) if self.clip is not None else None
        return document


# Settings a resumed run may change: they do not alter the arithmetic of the steps already taken.
RESUMABLE_CHANGES = ("steps", "validate_every", "save_every", "gradient_checkpointing")
OPTION_NAMES = {
    "steps": "--steps", "learning_rate": "--lr", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
    "objective": "--objective", "quant": "--quant", "schedule": "--schedule", "warmup_steps": "--warmup",
    "gradient_checkpointing": "--gradient-checkpointing", "validate_every": "--validate-every",
    "save_every": "--save-every", "seed": "--seed", "clip": "--clip", "sla2_learning_rate": "--sla2-lr",
    "validation_samples": "--validation-samples",
}
REQUIRED_RECIPE_KEYS = ("objective", "learning_rate", "steps", "batch_size", "gradient_checkpointing", "shift")


def option_name(field_name: str) -> str:
    """The CLI option of a setting, or the setting's own name (recipe-only settings)."""
    return OPTION_NAMES.get(field_name, field_name)


def recipe_defaults(recipe: Recipe) -> FinetuneSettings:
    """The recipe's `finetune` block as settings; a bad block is a packaging bug (ValueError naming it)."""
    block = dict(recipe.finetune)
    known = {item.name for item in fields(FinetuneSettings)}
    unknown = sorted(set(block) - known)
    missing = [key for key in REQUIRED_RECIPE_KEYS if key not in block]
    if unknown or missing:
        raise ValueError(f"recipe {recipe.name}: finetune block has unknown keys {unknown} or lacks {missing}")
    if block.get("clip") is not None:
        block["clip"] = tuple(block["clip"])
    settings = FinetuneSettings(**block)
    try:
        check_settings(settings)
    except UserError as error:
        raise ValueError(f"recipe {recipe.name}: finetune block: {error}") from None
    return settings


def with_overrides(defaults: FinetuneSettings, overrides: dict[str, Any]) -> FinetuneSettings:
    """`defaults` with every override that is not None; the result is checked."""
    settings = replace(defaults, **{key: value for key, value in overrides.items() if value is not None})
    check_settings(settings)
    return settings


def check_settings(settings: FinetuneSettings) -> None:
    """User mistakes, found before any model work; each message names the option to change."""
    if settings.steps < 1:
        raise UserError(f"--steps must be at least 1, got {settings.steps}")
    check_positive_number(settings.learning_rate, "--lr", "1e-5")
    if settings.sla2_learning_rate is not None:
        check_positive_number(settings.sla2_learning_rate, "--sla2-lr", "1e-3")
    if settings.batch_size < 1 or settings.grad_accum < 1:
        raise UserError(f"--batch-size and --grad-accum must be at least 1, got {settings.batch_size} and "
                        f"{settings.grad_accum}")
    if settings.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {settings.objective!r}")
    if settings.quant is not None and settings.quant not in REQUESTABLE_QUANT_MODES:
        raise UserError(f"--quant must be one of {', '.join(REQUESTABLE_QUANT_MODES)}, got {settings.quant!r}")
    if settings.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r}")
    if settings.warmup_steps < 0 or settings.validate_every < 0 or settings.save_every < 0:
        raise UserError("--warmup, --validate-every and --save-every must not be negative (0 turns them off)")
    if not 0.0 <= settings.min_lr_fraction <= 1.0 or settings.weight_decay < 0 or not is_positive_number(
        settings.grad_clip
    ):
        raise UserError("min_lr_fraction must lie in [0, 1], weight_decay >= 0 and grad_clip > 0")
    check_positive_number(settings.shift, "the timestep shift")
    if settings.validation_samples < 1:
        raise UserError(f"--validation-samples must be at least 1, got {settings.validation_samples}")
    if settings.clip is not None:
        frames, height, width = settings.clip
        if frames < 1 or height < 2 or width < 2 or height % 2 or width % 2:
            raise UserError(f"--clip {frames},{height},{width}: frames must be >= 1 and height, width even "
                            "(the patch is 1 x 2 x 2), e.g. --clip 2,16,16")


def check_partition(settings: FinetuneSettings, world_size: int) -> int:
    """Samples per process and micro-step; the global batch must split evenly over both."""
    share = world_size * settings.grad_accum
    if settings.batch_size % share:
        raise UserError(
            f"--batch-size {settings.batch_size} must be a multiple of processes ({world_size}) x --grad-accum "
            f"({settings.grad_accum}) = {share}; it is the global batch per optimizer step"
        )
    return settings.batch_size // share


def parse_clip(text: str) -> Clip:
    """'2,16,16' -> (2, 16, 16): latent frames, height, width."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise UserError(f"--clip must be FRAMES,HEIGHT,WIDTH in latent units (e.g. 2,16,16), got {text!r}")
    frames, height, width = (int(part) for part in parts)
    return frames, height, width


def resume_mismatches(stored: dict[str, Any], settings: FinetuneSettings) -> list[str]:
    """Settings that differ from a stored run's and may not change on resume, as 'option stored -> new'."""
    current = settings.to_json()
    return [
        f"{option_name(key)} {stored.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and stored.get(key) != value
    ]
