"""What a fine-tuning run shows while it works: a rich progress bar, or plain lines in a log file."""

from __future__ import annotations

import time

from rich.console import Console

from sla2cli.progress import progress_bar
from sla2cli.training.metrics import Row

PLAIN_LINE_SECONDS = 30.0


class ProgressReporter:
    """Rank 0's view of the run: step, loss, learning rate, samples/s, memory, ETA, last validation."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        # Where the bar cannot redraw (a log file), a plain line every PLAIN_LINE_SECONDS shows progress.
        self.plain = enabled and not console.is_terminal
        self.progress = progress_bar(
            console,
            label="[bold]fine-tuning[/]",
            figures="loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.1f} samples/s  "
            "mem {task.fields[memory]:.0f} MB  val {task.fields[validation]}",
            remaining=True,
            transient=False,
            enabled=enabled and not self.plain,
        )
        self.task = None
        self.last_line = time.monotonic()
        self.validation = "-"

    def __enter__(self) -> ProgressReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, total: int, completed: int) -> None:
        self.task = self.progress.add_task("finetune", total=total, completed=completed, loss=float("nan"),
                                           lr=0.0, rate=0.0, memory=0.0, validation=self.validation)

    def step(self, row: Row) -> None:
        self.progress.update(self.task, completed=row["step"], loss=row["loss"], lr=row["learning_rate"],
                             rate=row["samples_per_second"], memory=row["peak_memory_mb"],
                             validation=self.validation)
        if self.plain and time.monotonic() - self.last_line >= PLAIN_LINE_SECONDS:
            self.last_line = time.monotonic()
            self.note(f"step {row['step']} loss {row['loss']:.4f} lr {row['learning_rate']:.2e} "
                      f"{row['samples_per_second']:.1f} samples/s mem {row['peak_memory_mb']:.0f} MB "
                      f"val {self.validation}")

    def validated(self, step: int, loss: float) -> None:
        self.validation = f"{loss:.4f}"
        self.note(f"step {step}: validation loss {loss:.5f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, highlight=False)
