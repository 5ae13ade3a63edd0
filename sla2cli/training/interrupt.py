"""Ctrl-C and SIGTERM during training: finish the current step, save, and stop cleanly.

A second Ctrl-C gives up at once (KeyboardInterrupt), for when saving itself is what hangs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    """Set by a signal; the training loop polls it between steps."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.signal_number == signal.SIGINT and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report a process stopped by that signal."""
        return 128 + (self.signal_number or 0)


class Deadline(StopRequest):
    """A stop request that also fires once a time.monotonic() deadline has passed: a run with a time budget
    finishes its current step and stops (and says so) instead of being killed from outside."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @property
    def requested(self) -> bool:
        return self.signal_number is not None or self.expired


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM only set the request (main thread only; elsewhere a no-op)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, request.handle)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
