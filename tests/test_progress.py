"""The one progress bar of sla2: its columns, --quiet, and the step-by-name callback bench uses."""

import io

from rich.console import Console
from rich.progress import TimeRemainingColumn

from sla2cli.progress import StepProgress, progress_bar


def quiet_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_estimate_of_time_left_only_when_asked():
    assert not any(isinstance(c, TimeRemainingColumn) for c in progress_bar(quiet_console()).columns)
    assert any(isinstance(c, TimeRemainingColumn) for c in progress_bar(quiet_console(), remaining=True).columns)


def test_disabled_bar_draws_nothing():
    console = quiet_console()
    with progress_bar(console, enabled=False, transient=False) as progress:
        task = progress.add_task("work", total=2)
        progress.advance(task, 2)
    assert console.file.getvalue() == ""


def test_each_step_completes_the_previous_one():
    with progress_bar(quiet_console(), enabled=False) as progress:
        step = StepProgress(progress, total=3)
        task = progress.tasks[0]
        assert (task.description, task.completed) == ("starting", 0)
        step("fa2 1x2x256x64")
        assert (task.description, task.completed) == ("fa2 1x2x256x64", 0)
        step("sla2 1x2x256x64")
        step("sla2 1x2x512x64")
        assert (task.description, task.completed, task.total) == ("sla2 1x2x512x64", 2, 3)
