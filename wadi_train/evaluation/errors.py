"""The error that evaluation raises for bad input (wrong shapes, unreadable statistics)."""

from __future__ import annotations

from wadi_train.errors import WadiError

__all__ = ["EvaluationError"]


class EvaluationError(WadiError):
    """Features, samples or stored statistics are not what the evaluation expects."""
