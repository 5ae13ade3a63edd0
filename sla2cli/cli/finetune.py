"""`sla2 finetune`: stage 2 of training. Fine-tune a converted model end to end with SLA2 in place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sla2cli.cli.sample_options import DeviceOption, QuietOption
from sla2cli.devices import resolve_device
from sla2cli.ops.quantization import REQUESTABLE_QUANT_MODES
from sla2cli.training.finetune_output import print_result
from sla2cli.training.job import FinetuneRequest, run_finetune_job
from sla2cli.training.settings import parse_clip

HELP = (
    "Stage 2 of training: fine-tune an SLA2 checkpoint end to end (hard routing, router frozen, alpha and every "
    "base weight trained) with the flow-matching loss or by distillation from the dense model. Defaults come "
    "from the model's recipe. Writes a normal SLA2 checkpoint with the fine-tuned weights, the training state "
    "(--resume continues it exactly) and finetune_metrics.csv. Several GPUs: torchrun --nproc-per-node N -m "
    "sla2cli finetune ... (FSDP2)."
)
RECIPE = "Default: the recipe's"
Opt = typer.Option


def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="SLA2 checkpoint folder (sla2 convert or calibrate).",
                                               show_default=False)],
    out: Annotated[Path, Opt(help="Output checkpoint folder (also holds the training state).", show_default=False)],
    steps: Annotated[int | None, Opt(help=f"Optimizer steps in total. {RECIPE} (embedded: 2000).")] = None,
    lr: Annotated[float | None, Opt("--lr", help=f"Peak AdamW learning rate. {RECIPE} (embedded: 3e-4).")] = None,
    batch_size: Annotated[int | None, Opt(help=f"Global samples per optimizer step, over all processes and "
                                          f"accumulation steps. {RECIPE}.")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches accumulated per optimizer step.")] = None,
    data: Annotated[Path | None, Opt(help="Folder of precomputed latents and prompt embeddings (see README; "
                                     "needed for Hub models). Default: the embedded model's procedural clips.",
                                     show_default=False)] = None,
    clip: Annotated[str | None, Opt(help="Procedural clip size FRAMES,HEIGHT,WIDTH in latent units (embedded "
                                    "model). Default: 8,64,64.", show_default=False)] = None,
    objective: Annotated[str | None, Opt(help="flow (velocity loss) or distill (MSE to the frozen dense model).",
                                         show_default=False)] = None,
    quant: Annotated[str | None, Opt(help=f"Sparse-branch forward while training ({', '.join(REQUESTABLE_QUANT_MODES)}"
                                     "): quantisation-aware training; stored in the output (auto as auto: int8 "
                                     "only where measured faster than bf16 for training on that GPU, and the "
                                     "run says which). Default: the "
                                     "checkpoint's.", show_default=False)] = None,
    schedule: Annotated[str | None, Opt(help="cosine (to 10% of the peak) or constant, after the warm-up.")] = None,
    warmup: Annotated[int | None, Opt(help="Linear warm-up steps.")] = None,
    gradient_checkpointing: Annotated[bool | None, Opt(help="Recompute activations in the backward (less memory). "
                                                       f"{RECIPE}.", show_default=False)] = None,
    save_every: Annotated[int | None, Opt(help="Save the checkpoint and state every N steps (0: at the end only).")
                          ] = None,
    validate_every: Annotated[int | None, Opt(help="Held-out validation every N steps (always at start and end).")
                              ] = None,
    validation_samples: Annotated[int | None, Opt(help="Held-out clips to validate on (--data: unless its manifest "
                                                  "names them). Default: 8.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run saved in --out exactly.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace --out if it exists.")] = False,
    seed: Annotated[int | None, Opt(help="Seed of the clips, noise and timesteps drawn for training.")] = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Fine-tune, print the validation table, save."""
    overrides = {
        "steps": steps, "learning_rate": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "objective": objective, "quant": quant, "schedule": schedule, "warmup_steps": warmup,
        "gradient_checkpointing": gradient_checkpointing, "save_every": save_every,
        "validate_every": validate_every, "validation_samples": validation_samples, "seed": seed,
        "clip": parse_clip(clip) if clip is not None else None,
    }
    request = FinetuneRequest(checkpoint=checkpoint, out=out, overrides=overrides, data=data, resume=resume,
                              overwrite=overwrite, device=resolve_device(device), quiet=quiet)
    console = Console()
    result = run_finetune_job(request, console)
    if result.is_main:
        print_result(console, result, checkpoint)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add `sla2 finetune`."""
    app.command("finetune", help=HELP)(finetune)
