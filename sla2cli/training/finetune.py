"""Fine-tuning a model held in memory (`sla2cli.finetune`), and the summary every fine-tuning returns.

The same loop serves `sla2 finetune` (which adds checkpoints, resume and several processes, see `job`)
and this in-memory API, which the quality suite uses for every attention variant, the unconverted
dense model included: same data, same objective, same validation figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from sla2cli.embedded.config import DEFAULT_CLIP
from sla2cli.errors import UserError
from sla2cli.integration.conversion import conversion_info
from sla2cli.integration.recipes import EMBEDDED_RECIPE, Recipe, get_recipe, recipe_for_architecture
from sla2cli.training.data import ProceduralClips, TrainingData, check_fits, data_from_folder
from sla2cli.training.distributed import Processes
from sla2cli.training.interrupt import StopRequest
from sla2cli.training.loop import LoopResult, Trainer, run_loop, validate
from sla2cli.training.metrics import (
    DENSE_VALIDATION,
    Row,
    peak_memory_mb,
    train_losses,
    validation_row,
    validations,
)
from sla2cli.training.model_setup import frozen_dense_teacher, prepare_for_training, start_figures
from sla2cli.training.objectives import VALIDATION_CHUNK, validation_loss
from sla2cli.training.optim import TRAIN_ALL, TrainChoice, build_optimizer, finetune_parameter_groups
from sla2cli.training.progress import ProgressReporter
from sla2cli.training.settings import FinetuneSettings, check_partition, recipe_defaults, with_overrides

WAN_FAMILY = "wan"


@dataclass
class FinetuneSummary:
    """What a fine-tuning did: losses per step, validation before / after / dense, time, memory."""

    settings: FinetuneSettings
    start_step: int
    steps: int  # optimizer steps done in total (resumed ones included)
    validation_before: float  # the model as given, before any step
    dense_validation: float  # the same starting weights with dense attention
    validation_after: float | None  # None when interrupted before the end
    seconds: float
    peak_memory_mb: float
    samples_per_second: float
    trainable_parameters: int
    interrupted: bool = False
    rows: list[Row] = field(default_factory=list)
    data: str = ""

    @property
    def losses(self) -> list[float]:
        """Training loss of every step."""
        return train_losses(self.rows)

    @property
    def validations(self) -> list[tuple[int, float]]:
        """(step, validation loss) of the fine-tuned model, from the start to the end."""
        return validations(self.rows)


def model_recipe(model: nn.Module, recipe: str | None = None) -> Recipe:
    """The recipe of a converted model, or of an unconverted one by its architecture (or by name)."""
    if recipe is not None:
        return get_recipe(recipe)
    info = conversion_info(model)
    if info is not None:
        return get_recipe(info.recipe)
    config = getattr(model, "config", None)
    if config is None:
        raise UserError("cannot tell which recipe this model follows; pass recipe=NAME")
    return recipe_for_architecture(type(model).__name__, dict(config), {"transformer"})


def check_family(recipe: Recipe) -> None:
    """The objectives are written for Wan-family (rectified-flow) transformers."""
    if recipe.attention.processor != WAN_FAMILY:
        raise UserError(f"fine-tuning supports Wan-family models (the embedded model, Wan2.1, Wan2.2); "
                        f"{recipe.title} ({recipe.model_class}) is not supported yet")
    if len(recipe.components) != 1:
        raise UserError(f"{recipe.title} has {len(recipe.components)} transformers (experts by noise level); "
                        "fine-tuning them is not supported yet")


def resolve_clip(settings: FinetuneSettings, recipe: Recipe, has_data: bool) -> FinetuneSettings:
    """Procedural clips default to the embedded model's own size; --clip means nothing with --data."""
    if has_data:
        if settings.clip is not None:
            raise UserError("--clip sets the size of the embedded model's procedural clips; with --data the clip "
                            "size is the data's")
        return settings
    if recipe.source != EMBEDDED_RECIPE:
        raise UserError(f"{recipe.title} needs training data: pass --data FOLDER of precomputed latents "
                        "(see scripts/precompute_latents.py)")
    if settings.clip is None:
        settings = with_overrides(settings, {"clip": (DEFAULT_CLIP["frames"], DEFAULT_CLIP["height"],
                                                      DEFAULT_CLIP["width"])})
    return settings


def make_data(data: TrainingData | str | Path | None, settings: FinetuneSettings) -> TrainingData:
    """A data folder, a TrainingData object, or (None) the procedural clips at settings.clip."""
    if isinstance(data, TrainingData):
        return data
    if data is not None:
        return data_from_folder(Path(data), settings.seed, settings.validation_samples)
    return ProceduralClips(settings.clip, settings.seed, settings.validation_samples)


def summarize(result: LoopResult, settings: FinetuneSettings, start_step: int, before: float, dense: float,
              after: float | None, trainable: int, device: torch.device, data: TrainingData) -> FinetuneSummary:
    rates = result.samples_per_second[1:] or result.samples_per_second  # the first step includes warm-up
    return FinetuneSummary(
        settings=settings, start_step=start_step, steps=result.step, validation_before=before,
        dense_validation=dense, validation_after=after, seconds=result.seconds,
        peak_memory_mb=peak_memory_mb(device), samples_per_second=sum(rates) / len(rates) if rates else 0.0,
        trainable_parameters=trainable, interrupted=result.interrupted, rows=result.rows, data=data.describe(),
    )


def finetune(
    model: nn.Module,
    data: TrainingData | str | Path | None = None,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    train: TrainChoice = TRAIN_ALL,
    sla2_lr: float | None = None,
    device: torch.device | str | None = None,
    recipe: str | None = None,
    show_progress: bool = False,
    stop: StopRequest | None = None,
    **overrides: Any,
) -> FinetuneSummary:
    """Fine-tune `model` (converted to SLA2 or not) in place, in one process; returns the summary.

    Defaults come from the model's recipe (`finetune` block). `data`: None for the embedded model's
    procedural clips, a latent data folder, or a TrainingData. `train`: "all" (every parameter but the
    SLA2 router projections), fnmatch patterns of parameter names, or a predicate (name, parameter).
    `sla2_lr`: a separate peak learning rate for the SLA2 parameters. `stop` (e.g. an
    `interrupt.Deadline`) ends the loop after the current step; the summary then says `interrupted`.
    Further settings by name: grad_accum, objective ("flow" or "distill"), quant, schedule, warmup_steps, shift,
    gradient_checkpointing, validate_every, validation_samples, clip, seed, ... (FinetuneSettings).
    The model ends in float32 on `device` (default: where it is), in eval mode, with no grad required.
    """
    chosen = model_recipe(model, recipe)
    check_family(chosen)
    settings = with_overrides(recipe_defaults(chosen), {
        "steps": steps, "learning_rate": lr, "batch_size": batch_size, "sla2_learning_rate": sla2_lr, **overrides,
    })
    settings = resolve_clip(settings, chosen, has_data=data is not None)
    training_data = make_data(data, settings)
    check_fits(training_data, model)
    target = torch.device(device) if device is not None else next(model.parameters()).device
    processes = Processes(device=target)
    micro_batch = check_partition(settings, processes.world_size)
    use_autocast = target.type == "cuda"
    teacher = frozen_dense_teacher(model, torch.bfloat16 if use_autocast else torch.float32).to(target) if (
        settings.objective == "distill") else None
    trainable = prepare_for_training(model, device=target, quant=settings.quant, train=train,
                                     gradient_checkpointing=settings.gradient_checkpointing)
    validation = training_data.validation_set(target)
    before, dense = start_figures(model, validation, use_autocast)
    optimizer = build_optimizer(finetune_parameter_groups(
        model, learning_rate=settings.learning_rate, sla2_learning_rate=settings.sla2_learning_rate,
        weight_decay=settings.weight_decay))
    trainer = Trainer(model, optimizer, training_data, validation, settings, processes, micro_batch, use_autocast,
                      teacher)
    rows = [validation_row(0, dense, DENSE_VALIDATION), validation_row(0, before)]
    try:
        with ProgressReporter(Console(), enabled=show_progress) as reporter:
            result = run_loop(trainer, 0, rows, reporter=reporter, stop=stop)
        after = validate(trainer)
        rows.append(validation_row(result.step, after))
    finally:
        if settings.gradient_checkpointing:
            model.disable_gradient_checkpointing()
        model.eval().requires_grad_(False)
    return summarize(result, settings, 0, before, dense, after, len(trainable), target, training_data)


def evaluate(
    model: nn.Module,
    data: TrainingData | str | Path | None = None,
    *,
    clip: tuple[int, int, int] | None = None,
    validation_samples: int | None = None,
    recipe: str | None = None,
) -> float:
    """The held-out validation loss that fine-tuning reports, for any model (converted or not), on the
    device it is on (bf16 autocast on GPUs): the same clips, noise and times as `finetune` with the same
    `data`, `clip` and `validation_samples` (defaults: the recipe's)."""
    chosen = model_recipe(model, recipe)
    check_family(chosen)
    settings = with_overrides(recipe_defaults(chosen), {"clip": clip, "validation_samples": validation_samples})
    settings = resolve_clip(settings, chosen, has_data=data is not None)
    training_data = make_data(data, settings)
    check_fits(training_data, model)
    device = next(model.parameters()).device
    validation = training_data.validation_set(device)
    was_training = model.training
    model.eval()
    try:
        return validation_loss(model, validation.clean, validation.text, device.type == "cuda",
                               extras=validation.extras, chunk_size=VALIDATION_CHUNK)
    finally:
        model.train(was_training)
