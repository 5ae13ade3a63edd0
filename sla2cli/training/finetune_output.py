"""What `sla2 finetune` prints at the end: validation loss before and after, throughput, and how to resume."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sla2cli.training.job import JobResult


def print_result(console: Console, result: JobResult, checkpoint: Path) -> None:
    """The validation table (dense, SLA2 before, SLA2 after), one line of figures, and where it went; an
    interrupted run prints the exact command that resumes it."""
    summary = result.summary
    if result.already_done:
        console.print(f"{result.out} is already fine-tuned to step {summary.steps}; pass a larger --steps to go on",
                      highlight=False)
    table = Table(title=f"sla2 finetune: validation loss ({summary.data})", header_style="bold")
    table.add_column("model")
    table.add_column("validation loss", justify="right")
    table.add_row("dense attention, starting weights", f"{summary.dense_validation:.5f}")
    table.add_row("SLA2 before fine-tuning", f"{summary.validation_before:.5f}")
    after = "-" if summary.validation_after is None else f"{summary.validation_after:.5f}"
    table.add_row(f"SLA2 after {summary.steps} steps", after, style="bold")
    console.print(table)
    console.print(f"{summary.steps - summary.start_step} steps in {summary.seconds / 60:.2f} min, "
                  f"{summary.samples_per_second:.1f} samples/s, peak memory {summary.peak_memory_mb:.0f} MB; "
                  f"{summary.trainable_parameters} parameter tensors trained", highlight=False)
    if summary.interrupted:
        command = " ".join(shlex.quote(part) for part in ("sla2", "finetune", str(checkpoint), "--out",
                                                          str(result.out), "--resume"))
        console.print(f"[yellow]interrupted:[/] saved at step {summary.steps}; resume with: {command} "
                      "(same options)", highlight=False)
    elif not result.already_done:
        console.print(f"wrote {result.out}", highlight=False)
