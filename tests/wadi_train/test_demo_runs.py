"""The demo's runs: trained side by side in worker processes, progress forwarded, errors
raised in the parent, finished runs reused."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_config

from wadi_train.demo.runs import Runs, default_workers


def _cfg(tmp_path: Path, teacher: Path, name: str) -> dict:
    cfg = tiny_config(tmp_path, teacher, train={"steps": 3, "checkpoint_every": 3, "ema_decay": None})
    cfg["name"], cfg["output_dir"] = name, str(tmp_path / "runs" / name)
    return cfg


def test_two_runs_train_in_workers_and_report_progress(tmp_path: Path, tiny_teacher: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    reused: list[str] = []
    with Runs(2, lambda label, i, n, note: seen.append((label, i, n)), reused) as runs:
        runs.submit("a", _cfg(tmp_path, tiny_teacher, "a"))
        runs.submit("b", _cfg(tmp_path, tiny_teacher, "b"))
        results = {label: runs.result(label) for label in ("b", "a")}
    for label, (export, seconds) in results.items():
        assert (export / "model" / "config.json").is_file() and seconds > 0
        assert (label, 3, 3) in seen, seen  # every step reached the parent's stage callback
    assert {label for label, _, _ in seen} == {"a", "b"} and reused == []

    again: list[str] = []
    with Runs(2, lambda *a: pytest.fail(f"a finished run trained again: {a}"), again) as runs:
        runs.submit("a", _cfg(tmp_path, tiny_teacher, "a"))
        assert runs.result("a") == results["a"]
    assert again == ["a"]


def test_a_failing_run_raises_in_the_parent(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = _cfg(tmp_path, tiny_teacher, "bad")
    cfg["model"]["weights"] = str(tmp_path / "missing.safetensors")
    with Runs(2, lambda *a: None, []) as runs:
        runs.submit("bad", cfg)
        with pytest.raises(Exception, match="missing.safetensors"):
            runs.result("bad")


def test_one_worker_trains_in_this_process(tmp_path: Path, tiny_teacher: Path) -> None:
    seen: list[str] = []
    with Runs(1, lambda label, *a: seen.append(label), []) as runs:
        runs.submit("a", _cfg(tmp_path, tiny_teacher, "a"))
        assert seen == ["a"] * 3  # trained during submit, before any result() call
        assert runs._pool is None
        export, _ = runs.result("a")
    assert (export / "model").is_dir()


def test_default_workers() -> None:
    assert [default_workers(c) for c in (1, 2, 3, 16)] == [1, 2, 3, 4]


def test_default_workers_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert default_workers() == 3
