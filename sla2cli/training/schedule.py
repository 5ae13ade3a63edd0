"""Learning-rate schedules shared by the trainers: linear warm-up, then cosine decay or a constant rate."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def learning_rate_factor(step: int, progress: float, warmup_steps: int, min_fraction: float) -> float:
    """Warm-up over the first steps, then cosine from 1 down to `min_fraction` as progress goes 0 -> 1."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warmup * (min_fraction + (1.0 - min_fraction) * cosine)


def schedule_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_fraction: float) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based) of `total_steps`.

    Both schedules depend only on the step, so a resumed run follows the same rates as an uninterrupted one.
    """
    if schedule == "constant":
        return min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return learning_rate_factor(step, step / max(1, total_steps), warmup_steps, min_fraction)
