"""`sla2 finetune`: fine-tune an SLA2 checkpoint into a new one, resumable, in one process or many.

The output folder is a normal SLA2 checkpoint with the fine-tuned base weights included, plus the
training state (`state`) and the metrics CSV; it is written whole under a temporary name and renamed,
every --save-every steps, at the end, and when the run is interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from sla2cli import api
from sla2cli.checkpoint.format import CONFIG_FILE, TRAINING_METRICS_FILE, CheckpointConfig, read_config
from sla2cli.checkpoint.storage import write_checkpoint
from sla2cli.devices import out_of_memory_error
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder
from sla2cli.integration.recipes import get_recipe
from sla2cli.ops.quantization import QUANT_AUTO, check_runnable, choose_auto_quant
from sla2cli.training import distributed, state
from sla2cli.training.data import TrainingData, attention_shape, check_fits
from sla2cli.training.finetune import FinetuneSummary, check_family, make_data, resolve_clip, summarize
from sla2cli.training.interrupt import graceful_stop
from sla2cli.training.loop import LoopResult, Trainer, run_loop, validate
from sla2cli.training.metrics import (
    DENSE_VALIDATION,
    Row,
    read_metrics_csv,
    validation_row,
    validations,
    write_metrics_csv,
)
from sla2cli.training.model_setup import frozen_dense_teacher, prepare_for_training, start_figures
from sla2cli.training.optim import TRAIN_ALL, build_optimizer, finetune_parameter_groups
from sla2cli.training.progress import ProgressReporter
from sla2cli.training.settings import (
    RESUMABLE_CHANGES,
    FinetuneSettings,
    check_partition,
    option_name,
    recipe_defaults,
    resume_mismatches,
    with_overrides,
)

# What a run that ran out of memory can change; --out keeps its last save, if any.
OUT_OF_MEMORY_ADVICE = (
    "fine-tune with --gradient-checkpointing (a saved run: --resume --gradient-checkpointing), fewer samples per "
    "micro-batch (--grad-accum), a smaller --clip, or more GPUs (torchrun --nproc-per-node N); the README's "
    "fine-tuning section says how much memory a model needs"
)


@dataclass(frozen=True)
class FinetuneRequest:
    """What the user asked for on the command line."""

    checkpoint: Path
    out: Path
    overrides: dict[str, Any]
    data: Path | None = None
    resume: bool = False
    overwrite: bool = False
    device: torch.device = torch.device("cpu")
    quiet: bool = False


@dataclass
class JobResult:
    """The summary, where it was written, and the exit code (128 + signal when interrupted)."""

    summary: FinetuneSummary
    out: Path
    is_main: bool
    exit_code: int = 0
    already_done: bool = False


def source_identity(config: CheckpointConfig) -> dict[str, Any]:
    """What identifies the model a run fine-tunes, compared on --resume."""
    return {
        "recipe": config.recipe, "base_model": config.base.to_json(), "sparsity": config.sparsity,
        "block_q": config.block_q, "block_k": config.block_k, "attention_sha256": config.attention_sha256,
        "components": {name: list(record.converted_modules) for name, record in config.components.items()},
    }


def _significant(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.5g}")


def card_measurements(config: CheckpointConfig, settings: FinetuneSettings, data: TrainingData, step: int,
                      before: float, dense: float, after: float | None) -> dict[str, Any]:
    """The source checkpoint's measurements plus how this one was fine-tuned (shown in the model card)."""
    record = {
        "finetune_steps": step, "finetune_objective": settings.objective, "finetune_data": data.describe(),
        "finetune_quant": settings.quant, "finetune_learning_rate": settings.learning_rate,
        "finetune_batch_size": settings.batch_size, "finetune_seed": settings.seed,
        "finetune_validation_loss_before": _significant(before),
        "finetune_dense_validation_loss": _significant(dense),
    }
    if after is not None:
        record["finetune_validation_loss_after"] = _significant(after)
    return {**config.measurements, **record}


def _read_checkpoint(folder: Path) -> CheckpointConfig:
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} is not an SLA2 checkpoint folder (no {CONFIG_FILE}); create one with: "
                        f"sla2 convert MODEL --out {folder}")
    return read_config(folder)


def _check_resume(record: state.RunRecord, identity: dict, data: TrainingData, settings: FinetuneSettings,
                  request: FinetuneRequest) -> None:
    if record.source != identity:
        raise UserError(f"{request.out} was fine-tuned from another model than {request.checkpoint} (recipe, "
                        "base weights, sparsity or SLA2 parameters differ); resume with the CHECKPOINT it started from")
    if record.data != data.fingerprint():
        raise UserError(f"{request.out} was fine-tuned on other data ({record.data.get('kind')}); resume with the "
                        "same --data or --clip")
    changed = resume_mismatches(record.settings, settings)
    if changed:
        free = ", ".join(option_name(name) for name in RESUMABLE_CHANGES)
        raise UserError(f"{request.out} was fine-tuned with other settings ({'; '.join(changed)}); resume with the "
                        f"same ones (only {free} may change)")


def _load(folder: Path, device: torch.device) -> nn.Module:
    return api.load(str(folder.absolute()), dtype=torch.float32, device=device)


def prepare_settings(request: FinetuneRequest, config: CheckpointConfig) -> FinetuneSettings:
    """The recipe's defaults with the user's options; the clip size and quant mode made explicit."""
    recipe = get_recipe(config.recipe)
    check_family(recipe)
    settings = with_overrides(recipe_defaults(recipe), request.overrides)
    settings = resolve_clip(settings, recipe, has_data=request.data is not None)
    return settings if settings.quant is not None else replace(settings, quant=config.quantization)


def check_request(request: FinetuneRequest) -> tuple[CheckpointConfig, FinetuneSettings, state.RunRecord | None]:
    """Every check that needs no model: checkpoint, output folder, settings, resume state."""
    config = _read_checkpoint(request.checkpoint)
    if request.out.absolute() == request.checkpoint.absolute():
        raise UserError("--out must differ from CHECKPOINT: the checkpoint stays the run's starting point")
    settings = prepare_settings(request, config)
    try:
        check_runnable(settings.quant, request.device)  # a mode this GPU cannot run fails before any work
    except ValueError as error:
        raise UserError(f"--quant: {error}") from None
    if request.resume:
        record, _ = state.read_record(request.out)
        return config, settings, record
    check_output_folder(request.out, overwrite=request.overwrite)
    return config, settings, None


class Saver:
    """Writes the whole output checkpoint (weights, SLA2 parameters, card, state, metrics) from rank 0."""

    def __init__(self, request: FinetuneRequest, config: CheckpointConfig, trainer: Trainer, record: dict) -> None:
        self.request, self.config, self.trainer, self.record = request, config, trainer, record

    def __call__(self, step: int, rows: list[Row], after: float | None = None) -> None:
        trainer = self.trainer
        processes = trainer.processes
        weights = distributed.full_model_state(trainer.model)
        optimizer = distributed.full_optimizer_state(trainer.model, trainer.optimizer)
        rng = processes.gather_objects(state.rng_states(processes.device))
        if processes.is_main:
            record = state.RunRecord(step=step, samples_seen=step * trainer.settings.batch_size, **self.record)

            def extra_files(folder: Path) -> None:
                state.write_state(folder, record, optimizer, rng)
                write_metrics_csv(rows, folder / TRAINING_METRICS_FILE)

            write_checkpoint(
                self.request.out, {"transformer": trainer.model}, include_base_weights=True, overwrite=True,
                measurements=card_measurements(self.config, trainer.settings, trainer.data, step,
                                               record.validation_before, record.dense_validation, after),
                states={"transformer": weights}, extra_files=extra_files,
            )
        processes.barrier()


def run_finetune_job(request: FinetuneRequest, console: Console) -> JobResult:
    """Fine-tune CHECKPOINT into --out (or continue the run saved there); see the module docstring."""
    config, settings, record = check_request(request)
    data = make_data(request.data, settings)
    if record is not None:
        _check_resume(record, source_identity(config), data, settings, request)
    processes = distributed.start_processes(request.device)
    try:
        return _run(request, config, settings, record, data, processes, console)
    except torch.OutOfMemoryError as error:
        raise out_of_memory_error(processes.device, OUT_OF_MEMORY_ADVICE) from error
    finally:
        distributed.stop_processes(processes)


def _run(request: FinetuneRequest, config: CheckpointConfig, settings: FinetuneSettings,
         record: state.RunRecord | None, data: TrainingData, processes: distributed.Processes,
         console: Console) -> JobResult:
    micro_batch = check_partition(settings, processes.world_size)
    device = processes.device
    use_autocast = device.type == "cuda"
    model = _load(request.out if record is not None else request.checkpoint, device)
    check_fits(data, model)
    teacher = None
    if settings.objective == "distill":
        teacher_dtype = torch.bfloat16 if use_autocast else torch.float32
        teacher = (frozen_dense_teacher(_load(request.checkpoint, device), teacher_dtype, copy_model=False)
                   if record is not None else frozen_dense_teacher(model, teacher_dtype))
    trainable = prepare_for_training(model, device=device, quant=settings.quant, train=TRAIN_ALL,
                                     gradient_checkpointing=settings.gradient_checkpointing)
    if settings.quant == QUANT_AUTO and processes.is_main and not request.quiet:
        console.print(choose_auto_quant(device, attention_shape(data, model, micro_batch), training=True).reason,
                      highlight=False)
    validation = data.validation_set(device)
    if record is None:
        before, dense = start_figures(model, validation, use_autocast)
        rows = [validation_row(0, dense, DENSE_VALIDATION), validation_row(0, before)]
        start = 0
    else:
        before, dense, start = record.validation_before, record.dense_validation, record.step
        rows = _stored_rows(request.out, start)
    if processes.distributed:
        distributed.shard_model(model)
        if teacher is not None:
            distributed.shard_model(teacher)
    optimizer = build_optimizer(finetune_parameter_groups(
        model, learning_rate=settings.learning_rate, sla2_learning_rate=settings.sla2_learning_rate,
        weight_decay=settings.weight_decay))
    if record is not None:
        _restore(request.out, model, optimizer, processes)
    trainer = Trainer(model, optimizer, data, validation, settings, processes, micro_batch, use_autocast, teacher)
    fixed = {"settings": settings.to_json(), "source": source_identity(config), "data": data.fingerprint(),
             "world_size": processes.world_size, "validation_before": before, "dense_validation": dense}
    saver = Saver(request, config, trainer, fixed)
    if start >= settings.steps:
        result = LoopResult(step=start, rows=rows, seconds=0.0)
        after = next((loss for step, loss in reversed(validations(rows)) if step == start), None)
        summary = summarize(result, settings, start, before, dense, after, len(trainable), device, data)
        return JobResult(summary, request.out, processes.is_main, already_done=True)
    with graceful_stop() as stop, ProgressReporter(console, enabled=processes.is_main and not request.quiet) as bar:
        result = run_loop(trainer, start, rows, save=saver, reporter=bar, stop=stop)
        after = None
        if not result.interrupted:
            after = validate(trainer)
            rows.append(validation_row(result.step, after))
            bar.validated(result.step, after)
            saver(result.step, rows, after)
    summary = summarize(result, settings, start, before, dense, after, len(trainable), device, data)
    return JobResult(summary, request.out, processes.is_main, exit_code=stop.exit_code if result.interrupted else 0)


def _stored_rows(out: Path, step: int) -> list[Row]:
    path = out / TRAINING_METRICS_FILE
    if not path.is_file():
        raise UserError(f"{out} lacks {TRAINING_METRICS_FILE}; its fine-tuning state is incomplete, start again "
                        "without --resume")
    return [row for row in read_metrics_csv(path) if row["step"] <= step]


def _restore(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, processes: distributed.Processes) -> None:
    """Optimizer state (read by rank 0, broadcast when sharded) and this process's random states."""
    _, rest = state.read_record(out)
    full = state.read_optimizer_state(out, rest) if processes.is_main else {}
    distributed.load_optimizer_state(model, optimizer, full, processes)
    state.restore_rng_states(state.read_rng_states(out, processes.rank), processes.device)
