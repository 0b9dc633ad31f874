"""The demo's training runs: each one trained once (a finished run with the same config is
reused), several at a time in worker processes.

The digits U-Net is so small that two threads on one model run at about 0.6x of two
single-threaded models side by side (0.39 s per step with 2 threads; two 1-thread runs at
0.46 s per step each, on this 2-core machine), so the demo trains its independent runs in
``workers`` processes of ``cpus // workers`` threads each. Workers start with ``spawn`` (a fork
of a process whose OpenMP pool is running can hang) and report progress through a queue that
the parent drains while it waits.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from wadi_train.config import from_dict
from wadi_train.export import export_run
from wadi_train.train import train

__all__ = ["Runs", "default_workers"]

_progress: Any = None  # the worker's progress queue (set by _init_worker)


def _cpus() -> int:
    """Cores this process may use (sched_getaffinity is Linux-only; elsewhere all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> int:
    """Processes for the demo's runs: one per core, at most 4 (the demo trains at most 4 at once)."""
    return max(1, min(cpus or _cpus(), 4))


def _init_worker(progress: Any, threads: int) -> None:
    global _progress
    _progress = progress
    torch.set_num_threads(threads)


def _train_and_export(cfg: dict[str, Any], label: str, report: Any = None) -> float:
    """Train the run of `cfg`, export it and mark it done; returns the training seconds."""
    report = report or (lambda *a: _progress.put(a))
    config = from_dict(cfg)
    run = Path(config.output_dir)
    if run.exists():
        shutil.rmtree(run)
    start = time.perf_counter()
    train(config, progress=lambda i, n, m: report(label, i, n, f"student {m.get('loss_student', float('nan')):.4f}"))
    seconds = time.perf_counter() - start
    export_run(run, run / "export", use_ema=config.train.ema_decay is not None, overwrite=True)
    (run / "done.json").write_text(json.dumps({"config": cfg, "seconds": seconds}))
    return seconds


class Runs:
    """Starts runs (`submit`) and hands back their exports (`result`).

    With ``workers == 1`` a run trains in this process when it is submitted; otherwise it
    trains in a pool of ``workers`` processes, and ``result`` forwards the progress of every
    run to ``stage`` while it waits. Use as a context manager (it shuts the pool down).
    """

    def __init__(self, workers: int, stage: Any, reused: list[str]):
        self.workers, self.stage, self.reused = workers, stage, reused
        self._done: dict[str, float] = {}
        self._futures: dict[str, Future[float]] = {}
        self._exports: dict[str, Path] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None

    def __enter__(self) -> "Runs":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = mp.get_context("spawn")
            self._queue = ctx.Queue()
            threads = max(1, _cpus() // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self._queue, threads))
        return self._pool

    def submit(self, label: str, cfg: dict[str, Any]) -> None:
        """Start the run `label` (or reuse it: a finished run with this exact config)."""
        run = Path(cfg["output_dir"])
        self._exports[label] = run / "export"
        done_file = run / "done.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        if done.get("config") == cfg:
            self.reused.append(label)
            self._done[label] = float(done["seconds"])
        elif self.workers == 1:
            self._done[label] = _train_and_export(cfg, label, self.stage)
        else:
            self._futures[label] = self._start_pool().submit(_train_and_export, cfg, label)

    def result(self, label: str) -> tuple[Path, float]:
        """Wait for `label` (showing every run's progress); returns (export folder, training seconds).

        Raises:
            Whatever the run raised in its worker.
        """
        future = self._futures.pop(label, None)
        if future is not None:
            while not future.done():
                self._pump(0.2)
            self._pump(0)
            self._done[label] = future.result()
        return self._exports[label], self._done[label]

    def _pump(self, timeout: float) -> None:
        """Forward queued progress reports to `stage` (waiting up to `timeout` for the first)."""
        try:
            item = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
            while True:
                self.stage(*item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
