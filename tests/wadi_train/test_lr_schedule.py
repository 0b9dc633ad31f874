"""The student's learning-rate schedule against values worked out by hand, and in a real run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny import tiny_config

from wadi_train.config import from_dict
from wadi_train.lr_schedule import lr_factor
from wadi_train.train import train


def test_warmup_then_constant() -> None:
    assert [lr_factor(s, 4, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0, 10) == 1.0


def test_cosine_reaches_the_floor_at_the_last_step() -> None:
    # warm-up 2, 12 steps: the cosine runs over steps 2..11 (span 9)
    got = [lr_factor(s, 2, 12, "cosine", 0.1) for s in range(14)]
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10)] + [0.1, 0.1]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[2] == pytest.approx(1.0) and got[11] == pytest.approx(0.1)
    assert lr_factor(6, 2, 12, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
    assert all(a >= b for a, b in zip(got[1:], got[2:]))  # never rises after the warm-up


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(0, 0, 10, "step")


def test_a_run_logs_the_cosine_learning_rate(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 4, "log_every": 1}, optim={"student_lr": 1e-3, "lr_schedule": "cosine", "min_lr_ratio": 0.2}))
    res = train(cfg)
    # after the last step the scheduler has stepped 4 times: factor(4) = the floor
    assert res.last["lr_student"] == pytest.approx(1e-3 * 0.2)
