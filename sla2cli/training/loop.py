"""The fine-tuning loop: accumulate gradients over micro-batches, clip, step AdamW, validate, save.

Loss scaling: each process averages its micro-batch's per-sample losses and divides by the number of
accumulation steps; FSDP averages gradients over processes. With B = processes x accumulation x
micro-batch, the gradient is exactly that of the mean loss over the B samples of the step, whatever
the split, and so is the logged loss (summed over processes, divided by B).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sla2cli.training.data import TrainingData, ValidationSet, training_batch
from sla2cli.training.distributed import Processes, set_gradient_sync
from sla2cli.training.interrupt import StopRequest
from sla2cli.training.metrics import TRAIN, Row, peak_memory_mb, validation_row
from sla2cli.training.objectives import VALIDATION_CHUNK, distill_loss, flow_loss, validation_loss
from sla2cli.training.optim import set_learning_rates
from sla2cli.training.progress import ProgressReporter
from sla2cli.training.schedule import schedule_factor
from sla2cli.training.settings import FinetuneSettings


@dataclass
class Trainer:
    """A model ready to train (sharded or not), its optimizer, data and settings."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: TrainingData
    validation: ValidationSet
    settings: FinetuneSettings
    processes: Processes
    micro_batch: int
    use_autocast: bool
    teacher: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.processes.device

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast)


@dataclass
class LoopResult:
    """How the loop ended: steps done in total, metric rows (all of the run, resumed ones included)."""

    step: int
    rows: list[Row]
    seconds: float
    interrupted: bool = False
    samples_per_second: list[float] = field(default_factory=list)


def sample_indices(step: int, micro: int, settings: FinetuneSettings, processes: Processes, micro_batch: int
                   ) -> list[int]:
    """Global indices of the samples that this process's micro-step `micro` of optimizer step `step` trains on."""
    first = step * settings.batch_size + (micro * processes.world_size + processes.rank) * micro_batch
    return list(range(first, first + micro_batch))


def micro_step_loss(trainer: Trainer, step: int, micro: int) -> torch.Tensor:
    """Per-sample losses (micro_batch,) of one micro-step, after their backward pass."""
    settings = trainer.settings
    indices = sample_indices(step, micro, settings, trainer.processes, trainer.micro_batch)
    batch = training_batch(trainer.data, indices, seed=settings.seed, shift=settings.shift, device=trainer.device)
    with trainer.autocast():
        if settings.objective == "distill":
            losses = distill_loss(trainer.model, trainer.teacher, batch)
        else:
            losses = flow_loss(trainer.model, batch)
    (losses.mean() / settings.grad_accum).backward()
    return losses.detach()


def _scalar(value: torch.Tensor) -> float:
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


def train_step(trainer: Trainer, step: int) -> tuple[float, float, float]:
    """One optimizer step; returns (mean loss over the global batch, gradient norm before clipping, lr)."""
    settings = trainer.settings
    factor = schedule_factor(step, settings.steps, settings.schedule, settings.warmup_steps, settings.min_lr_fraction)
    lr = set_learning_rates(trainer.optimizer, factor)
    trainer.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=trainer.device, dtype=torch.float64)
    for micro in range(settings.grad_accum):
        set_gradient_sync(trainer.model, micro == settings.grad_accum - 1)
        total += micro_step_loss(trainer, step, micro).double().sum()
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
    trainer.optimizer.step()
    loss = trainer.processes.sum(total) / settings.batch_size
    return float(loss), _scalar(norm), lr


def validate(trainer: Trainer) -> float:
    """The held-out validation loss (every process computes it whole, on the same weights)."""
    trainer.model.eval()
    try:
        return validation_loss(
            trainer.model, trainer.validation.clean, trainer.validation.text, trainer.use_autocast,
            extras=trainer.validation.extras, chunk_size=VALIDATION_CHUNK,
        )
    finally:
        trainer.model.train()


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and step % every == 0 and step < last


def run_loop(
    trainer: Trainer,
    start_step: int,
    rows: list[Row],
    *,
    save: Callable[[int, list[Row]], None] | None = None,
    reporter: ProgressReporter | None = None,
    stop: StopRequest | None = None,
) -> LoopResult:
    """Train from `start_step` to settings.steps; validate and save on schedule; stop early on request.

    `rows` are the metric rows so far (empty for a new run) and grow in place. The final validation and
    save are the caller's, so that it can add its own figures to the last checkpoint.
    """
    settings = trainer.settings
    result = LoopResult(step=start_step, rows=rows, seconds=0.0)
    started = time.perf_counter()
    trainer.model.train()
    if reporter is not None:
        reporter.start(settings.steps, start_step)
    for step in range(start_step, settings.steps):
        began = time.perf_counter()
        loss, grad_norm, lr = train_step(trainer, step)
        done = step + 1
        rate = settings.batch_size / max(time.perf_counter() - began, 1e-9)
        result.samples_per_second.append(rate)
        row = {"step": done, "kind": TRAIN, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
               "samples_per_second": rate, "elapsed_seconds": time.perf_counter() - started,
               "peak_memory_mb": peak_memory_mb(trainer.device)}
        rows.append(row)
        result.step = done
        if reporter is not None:
            reporter.step(row)
        if _due(done, settings.validate_every, settings.steps):
            value = validate(trainer)
            rows.append(validation_row(done, value))
            if reporter is not None:
                reporter.validated(done, value)
        stopping = trainer.processes.any(stop is not None and stop.requested)
        if save is not None and (stopping or _due(done, settings.save_every, settings.steps)):
            save(done, rows)
        if stopping:
            result.interrupted = True
            break
    result.seconds = time.perf_counter() - started
    return result
