"""Train the embedded model from scratch on procedural clips with the rectified-flow objective.

Recipe: x_t = (1 - t) x0 + t noise with t ~ U(0, 1), the model gets timestep t * 1000 and the clip's text
embedding and predicts the velocity noise - x0 (MSE). AdamW (no decay on gains and biases), linear warm-up
then cosine decay to 10%, gradient clipping at 1, bfloat16 autocast on CUDA. The schedule follows whichever
runs out first, the step count or the time budget, so a run cut by its budget still ends at a low learning rate.

The shipped weights come from `python scripts/train_embedded.py --out sla2cli/assets/ --device cuda`
on one GPU (defaults: 8 minutes, batch 8 clips of 8 x 64 x 64 latents, peak learning rate 6e-4, q/k
logit gain 4 at initialisation); the json next to them records the exact settings, device, step count and
losses of that run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file

from sla2cli.devices import resolve_device
from sla2cli.embedded.config import (
    CONFIG_FILENAME,
    DEFAULT_CLIP,
    WEIGHTS_FILENAME,
    default_config,
    save_config,
)
from sla2cli.embedded.loading import build_embedded_model
from sla2cli.embedded.synthetic import (
    TEXT_DIM,
    TEXT_TOKENS,
    VALIDATION_SEED_BASE,
    make_batch,
    stack_clips,
    validation_clips,
)
from sla2cli.errors import UserError
from sla2cli.files import atomic_path
from sla2cli.progress import progress_bar
from sla2cli.training.objectives import flow_matching_loss, validation_loss
from sla2cli.training.optim import parameter_groups
from sla2cli.training.schedule import learning_rate_factor


@dataclass
class TrainSettings:
    """Everything a training run depends on; stored in the shipped json so the run can be repeated."""

    out_dir: Path
    steps: int = 20_000
    minutes: float = 8.0
    batch_size: int = 8
    frames: int = DEFAULT_CLIP["frames"]
    height: int = DEFAULT_CLIP["height"]
    width: int = DEFAULT_CLIP["width"]
    learning_rate: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    qk_gain: float = 4.0
    seed: int = 0
    device: str = "cuda"
    validation_clips: int = 8
    log_every: int = 10
    log_line_seconds: float = 30.0


@dataclass
class TrainSummary:
    """What a run did: its settings, how far it got and its losses."""

    settings: TrainSettings
    steps_done: int
    seconds: float
    first_loss: float
    final_loss: float
    validation_loss_before: float
    validation_loss_after: float
    weights_path: Path
    config_path: Path
    loss_history: list[float] = field(default_factory=list)


def scale_attention_logits(model: WanTransformer3DModel, gain: float) -> None:
    """Start every attention layer's logits `gain` times larger, through the q and k RMSNorm gains.

    Why: with unit gains the logits of RMS-normalised q and k lie within +-sqrt(head_dim), and a short
    training run leaves them there, so weakly used heads stay near-uniform. Larger initial gains let a
    head commit to the few keys it needs; they remain ordinary trained parameters afterwards.
    """
    if gain == 1.0:
        return
    factor = math.sqrt(gain)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight")):
                parameter.mul_(factor)


def check_settings(settings: TrainSettings) -> None:
    """Reject settings that cannot run, with a message saying which option to change."""
    if settings.steps < 1:
        raise UserError("--steps must be at least 1")
    if settings.minutes <= 0:
        raise UserError("--minutes must be positive")
    if settings.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if settings.frames < 1 or settings.height < 2 or settings.width < 2:
        raise UserError("--frames must be >= 1 and --height/--width >= 2")
    if settings.height % 2 or settings.width % 2:
        raise UserError("--height and --width must be even (the patch is 2 x 2)")
    if not settings.qk_gain > 0:
        raise UserError("--qk-gain must be positive")


def save_weights_atomically(model: WanTransformer3DModel, path: Path) -> None:
    """fp32 safetensors written under a temporary name and renamed into place."""
    tensors = {name: value.detach().float().cpu().contiguous() for name, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})


def _progress_bar(enabled: bool, console: Console) -> Progress:
    return progress_bar(
        console, label="[bold]training[/]", figures="loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}",
        transient=False, enabled=enabled,
    )


def train_embedded_model(settings: TrainSettings, show_progress: bool = True) -> TrainSummary:
    """Train from a fresh initialisation and write `embedded_wan.safetensors` + `.json` to `out_dir`."""
    check_settings(settings)
    device = resolve_device(settings.device)
    use_autocast = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(settings.seed)
    model = build_embedded_model()
    scale_attention_logits(model, settings.qk_gain)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay), lr=settings.learning_rate, betas=(0.9, 0.99)
    )
    scene_seeds = random.Random(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    held_out = validation_clips(
        settings.validation_clips, (settings.frames, settings.height, settings.width), TEXT_DIM, TEXT_TOKENS
    )
    held_out_clean, held_out_text = (tensor.to(device) for tensor in stack_clips(held_out))

    model.eval()
    loss_before = validation_loss(model, held_out_clean, held_out_text, use_autocast)
    model.train()
    budget_seconds = settings.minutes * 60.0
    start = time.monotonic()
    history: list[float] = []
    smoothed = float("nan")
    console = Console()
    # Where the bar cannot redraw (a log file), a plain line every `log_line_seconds` shows progress instead.
    plain_lines = show_progress and not console.is_terminal
    last_line = start
    with _progress_bar(show_progress, console) as progress:
        task = progress.add_task("train", total=settings.steps, loss=float("nan"), lr=0.0)
        for step in range(settings.steps):
            elapsed = time.monotonic() - start
            if elapsed >= budget_seconds:
                break
            fraction = max(step / settings.steps, elapsed / budget_seconds)
            lr = settings.learning_rate * learning_rate_factor(
                step, fraction, settings.warmup_steps, settings.min_lr_fraction
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            seeds = [scene_seeds.randrange(VALIDATION_SEED_BASE) for _ in range(settings.batch_size)]
            clean, text = make_batch(
                seeds, settings.frames, settings.height, settings.width, TEXT_DIM, TEXT_TOKENS, device
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = flow_matching_loss(model, clean, text, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            value = loss.item()
            history.append(value)
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            if step % settings.log_every == 0 or step == settings.steps - 1:
                progress.update(task, completed=step + 1, loss=smoothed, lr=lr)
            if plain_lines and time.monotonic() - last_line >= settings.log_line_seconds:
                last_line = time.monotonic()
                console.print(
                    f"step {step + 1} loss {smoothed:.4f} lr {lr:.2e} elapsed {last_line - start:.0f} s",
                    highlight=False,
                )
        progress.update(task, completed=len(history), loss=smoothed)
    seconds = time.monotonic() - start

    model.eval()
    loss_after = validation_loss(model, held_out_clean, held_out_text, use_autocast)
    out_dir = Path(settings.out_dir)
    weights_path = out_dir / WEIGHTS_FILENAME
    config_path = out_dir / CONFIG_FILENAME
    summary = TrainSummary(
        settings=settings,
        steps_done=len(history),
        seconds=seconds,
        first_loss=history[0] if history else float("nan"),
        final_loss=_tail_mean(history),
        validation_loss_before=loss_before,
        validation_loss_after=loss_after,
        weights_path=weights_path,
        config_path=config_path,
        loss_history=history,
    )
    save_weights_atomically(model, weights_path)
    save_config(_config_with_training(summary, device), config_path)
    return summary


def _tail_mean(values: list[float], count: int = 50) -> float:
    tail = values[-count:]
    return sum(tail) / len(tail) if tail else float("nan")


def _config_with_training(summary: TrainSummary, device: torch.device) -> dict:
    """The shipped json: architecture plus how the weights were made."""
    settings = asdict(summary.settings)
    settings["out_dir"] = None
    config = default_config()
    config["training"] = {
        "settings": settings,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps_done": summary.steps_done,
        "seconds": round(summary.seconds, 1),
        "first_loss": round(summary.first_loss, 5),
        "final_loss": round(summary.final_loss, 5),
        "validation_loss_before": round(summary.validation_loss_before, 5),
        "validation_loss_after": round(summary.validation_loss_after, 5),
        "torch_version": torch.__version__,
    }
    return config
