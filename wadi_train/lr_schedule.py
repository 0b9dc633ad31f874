"""Learning-rate schedules of the student: a linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "lr_factor"]

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps. After it, ``constant``
    keeps 1; ``cosine`` falls from 1 to ``min_ratio`` along half a cosine, reaching
    ``min_ratio`` at the last step (``total - 1``) and staying there.

    Args:
        step: Optimizer steps taken so far.
        warmup: Warm-up steps (0 for none).
        total: Total training steps (train.steps).
        schedule: ``constant`` or ``cosine``.
        min_ratio: Final multiplier of the cosine schedule, in [0, 1].

    Returns:
        The multiplier, in (0, 1].

    Raises:
        ValueError: For an unknown schedule.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use one of {LR_SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
