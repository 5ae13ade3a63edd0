"""The rich progress bar every long step of sla2 shows, in one place so that all commands look alike.

Columns: a label, the bar, done/total, time elapsed; a run may add figures of its own after the count
(loss, learning rate) and an estimate of the time left. Work that reports steps by name (bench) goes
through `StepProgress`.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

DESCRIPTION = "[progress.description]{task.description}"  # the task's own description, changing as it runs


def progress_bar(
    console: Console,
    *,
    label: str = DESCRIPTION,
    figures: str | None = None,
    remaining: bool = False,
    transient: bool = True,
    enabled: bool = True,
) -> Progress:
    """A progress bar on `console`.

    label: the text before the bar (a fixed label, or the task's description by default); figures: a
    format of the task's fields shown after the count; remaining: add an estimate of the time left;
    transient: the bar disappears when done (commands that print a table afterwards); enabled=False
    draws nothing (--quiet, or processes other than the first).
    """
    columns: list[ProgressColumn] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    if figures is not None:
        columns.append(TextColumn(figures))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=transient, disable=not enabled)


class StepProgress:
    """A callback for work that announces each step by name: a new step completes the previous one."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=total)
        self.started = False

    def __call__(self, description: str) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=description)
