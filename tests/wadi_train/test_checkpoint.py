"""Checkpoints: bit-exact round trip and resume, atomicity under simulated crashes and SIGKILL,
corruption and disk-full errors that teach, pruning, and the `latest` pointer's fallback."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wadi_train import checkpoint as ck
from wadi_train.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSaveError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from wadi_train.ema import EMA
from wadi_train.errors import WadiError

REPO = Path(__file__).resolve().parents[2]


# -- a toy run: Linear + AdamW + LambdaLR + EMA, batches from a generator and the global RNGs --
class Toy:
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = nn.Linear(6, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _warmup)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.ema = EMA(self.named(), decay=0.9)
        self.step = 0

    def named(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(8, 6, generator=self.gen)  # the data generator
            target = torch.randn(8, 3)  # torch's global CPU RNG
            scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())  # python, numpy
            loss = scale * ((self.model(x) - target) ** 2).mean()
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            self.ema.update(self.named())
            self.step += 1

    def save(self, run_dir: Path, **kw: Any) -> Path:
        ema = self.ema.state_dict()
        return save_checkpoint(
            run_dir,
            self.step,
            tensors={"student": dict(self.model.state_dict()), "ema": ema["shadow"]},
            optimizers={"student": self.opt.state_dict()},
            schedulers={"student": self.sched.state_dict()},
            rng=capture_rng({"data": self.gen}),
            extra={"ema_updates": ema["num_updates"]},
            config={"lr": 1e-2, "betas": [0.9, 0.999]},
            **kw,
        )

    def load(self, path: Path) -> None:
        c = load_checkpoint(path)
        self.model.load_state_dict(c.tensors["student"])
        self.opt.load_state_dict(c.optimizers["student"])
        self.sched.load_state_dict(c.schedulers["student"])
        self.ema.load_state_dict(
            {"shadow": c.tensors["ema"], "num_updates": c.extra["ema_updates"]}
        )
        restore_rng(c.rng, {"data": self.gen})
        self.step = c.step


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def _draws(gen: torch.Generator) -> list[float]:
    return [
        random.random(),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(1).item(),
        torch.rand(1, generator=gen).item(),
    ]


def _assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    else:
        assert a == b


def _saved(run_dir: Path, step: int, value: float = 0.0, **kw: Any) -> Path:
    return save_checkpoint(
        run_dir,
        step,
        tensors={"student": {"w": torch.full((4,), float(step) + value)}},
        optimizers={},
        schedulers={},
        extra={"value": value},
        **kw,
    )


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# -- round trip and resume ------------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    toy = Toy(0)
    toy.train(3)
    odd = {"bf16": torch.randn(3, 5).bfloat16(), "i64": torch.arange(7), "empty": torch.zeros(0, 4)}
    rng = capture_rng({"data": toy.gen})
    after_save = _draws(toy.gen)
    path = save_checkpoint(
        tmp_path,
        3,
        tensors={
            "student": dict(toy.model.state_dict()),
            "ema": toy.ema.state_dict()["shadow"],
            "odd": odd,
        },
        optimizers={"student": toy.opt.state_dict()},
        schedulers={"student": toy.sched.state_dict()},
        rng=rng,
        extra={"n": 1, "s": "x"},
        config={"a": {"b": [1, 2]}},
    )
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "student.safetensors",
            "ema.safetensors",
            "odd.safetensors",
            "optimizers.pt",
            "schedulers.pt",
            "rng.pt",
            "state.json",
        ]
    )
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000003\n"
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and state["format_version"] == ck.FORMAT_VERSION
    assert state["files"]["optimizers.pt"]["bytes"] == (path / "optimizers.pt").stat().st_size
    assert len(state["files"]["rng.pt"]["sha256"]) == 64

    c = load_checkpoint(path)
    assert (c.step, c.extra, c.config, c.path) == (
        3,
        {"n": 1, "s": "x"},
        {"a": {"b": [1, 2]}},
        path,
    )
    _assert_state_equal(c.tensors["student"], dict(toy.model.state_dict()))
    _assert_state_equal(c.tensors["odd"], odd)
    _assert_state_equal(c.optimizers["student"], toy.opt.state_dict())
    _assert_state_equal(c.schedulers["student"], toy.sched.state_dict())
    fresh = Toy(7)
    fresh.opt.load_state_dict(c.optimizers["student"])
    _assert_state_equal(fresh.opt.state_dict(), toy.opt.state_dict())

    random.seed(99), np.random.seed(99), torch.manual_seed(99), toy.gen.manual_seed(99)
    restore_rng(c.rng, {"data": toy.gen})
    assert _draws(toy.gen) == after_save


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = Toy(0)
    straight.train(6)

    first = Toy(0)
    first.train(3)
    first.save(tmp_path)
    resumed = Toy(123)  # fresh objects, different seeds and global RNG states
    resumed.train(1)
    resumed.load(latest_checkpoint(tmp_path))
    resumed.train(3)

    assert resumed.step == straight.step == 6
    _assert_state_equal(dict(resumed.model.state_dict()), dict(straight.model.state_dict()))
    _assert_state_equal(resumed.opt.state_dict(), straight.opt.state_dict())
    _assert_state_equal(resumed.sched.state_dict(), straight.sched.state_dict())
    _assert_state_equal(resumed.ema.state_dict(), straight.ema.state_dict())


@pytest.mark.parametrize("kind", ["lambda", "constant", "sequential", "cosine", "plateau"])
def test_scheduler_state_dicts_load_with_weights_only(tmp_path: Path, kind: str) -> None:
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=0.1)
    lr = torch.optim.lr_scheduler
    make: dict[str, Callable[[], Any]] = {
        "lambda": lambda: lr.LambdaLR(opt, lambda s: 0.5**s),
        "constant": lambda: lr.ConstantLR(opt, factor=0.5, total_iters=3),
        "sequential": lambda: lr.SequentialLR(
            opt, [lr.ConstantLR(opt), lr.LinearLR(opt)], milestones=[2]
        ),
        "cosine": lambda: lr.CosineAnnealingLR(opt, T_max=10),
        "plateau": lambda: lr.ReduceLROnPlateau(opt),
    }
    sched = make[kind]()
    for _ in range(3):
        opt.step()
        sched.step(1.0) if kind == "plateau" else sched.step()
    path = save_checkpoint(
        tmp_path,
        1,
        tensors={},
        optimizers={"o": opt.state_dict()},
        schedulers={"s": sched.state_dict()},
    )
    _assert_state_equal(load_checkpoint(path).schedulers["s"], sched.state_dict())


class _Ramp:  # a callable LambdaLR "lambda" whose __dict__ lands in the state dict
    def __init__(self) -> None:
        self.cfg = Path("/not/plain/data")

    def __call__(self, step: int) -> float:
        return 1.0


def test_state_that_weights_only_would_refuse_is_refused_before_writing(tmp_path: Path) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Ramp())
    with pytest.raises(
        CheckpointSaveError, match=r"schedulers\['s'\]\['lr_lambdas'\]\[0\]\['cfg'\].*weights_only"
    ):
        save_checkpoint(
            tmp_path, 1, tensors={}, optimizers={}, schedulers={"s": sched.state_dict()}
        )
    with pytest.raises(CheckpointSaveError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, tensors={}, extra={"p": Path("x")})
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoints").exists()


def test_loaded_optimizer_state_never_writes_back_into_the_file(tmp_path: Path) -> None:
    toy = Toy(0)
    toy.train(2)
    path = toy.save(tmp_path)
    again = Toy(0)
    again.load(path)  # optimizer tensors may be memory-mapped from optimizers.pt
    again.train(3)  # AdamW updates them in place
    load_checkpoint(path)  # sha256 still matches


# -- atomicity ------------------------------------------------------------------------------
def _failing_rename(
    monkeypatch: pytest.MonkeyPatch, when: Callable[[str, str], bool], exc: BaseException
) -> None:
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if when(Path(src).name, Path(dst).name):
            raise exc
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def _simulate_hard_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing gets cleaned up or rolled back, as if the process died at the failure."""
    monkeypatch.setattr(ck, "_discard", lambda path: None)
    monkeypatch.setattr(ck, "_best_effort", lambda fn, *args: None)


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("hard", [False, True], ids=["exception", "hard-crash"])
def test_crash_while_renaming_into_place_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard: bool
) -> None:
    first = _saved(tmp_path, 1)
    if hard:
        _simulate_hard_crash(monkeypatch)
    _failing_rename(
        monkeypatch,
        lambda src, dst: src.startswith(".tmp-step-000002"),
        _Killed() if hard else OSError(errno.EIO, "I/O error"),
    )
    with pytest.raises(_Killed if hard else CheckpointSaveError):
        _saved(tmp_path, 2)
    monkeypatch.undo()

    names = _entries(tmp_path)
    assert (
        "step-000002" not in names
        and (tmp_path / "checkpoints" / "latest").read_text() == "step-000001\n"
    )
    assert any(n.startswith(".tmp-step-000002") for n in names) == hard  # leftover only if killed
    assert latest_checkpoint(tmp_path) == first
    assert _entries(tmp_path) == [".lock", "latest", "step-000001"]  # leftovers cleaned
    assert load_checkpoint(first).tensors["student"]["w"].tolist() == [1.0] * 4


def test_crash_while_publishing_latest_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _saved(tmp_path, 1)
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "I/O error", str(src))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointSaveError, match="step-000002"):
        _saved(tmp_path, 2)
    monkeypatch.setattr(os, "replace", real)
    assert _entries(tmp_path) == [".lock", "latest", "step-000001"]
    assert latest_checkpoint(tmp_path) == first


def test_crash_mid_write_leaves_only_a_tmp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _saved(tmp_path, 1)
    _simulate_hard_crash(monkeypatch)
    real_save = torch.save

    def half_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a zip")
        raise _Killed

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(_Killed):
        _saved(tmp_path, 2)
    monkeypatch.undo()
    assert torch.save is real_save
    assert [n for n in _entries(tmp_path) if n.startswith("step-")] == ["step-000001"]
    assert latest_checkpoint(tmp_path) == first and _entries(tmp_path) == [
        ".lock",
        "latest",
        "step-000001",
    ]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    _saved(tmp_path, 1)
    path = _saved(tmp_path, 1, value=0.5)
    assert load_checkpoint(path).tensors["student"]["w"].tolist() == [1.5] * 4
    assert _entries(tmp_path) == [".lock", "latest", "step-000001"]


def test_crash_between_setting_aside_and_renaming_in_restores_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved(tmp_path, 1)
    _simulate_hard_crash(monkeypatch)
    _failing_rename(monkeypatch, lambda src, dst: src.startswith(".tmp-step-"), _Killed())
    with pytest.raises(_Killed):
        _saved(tmp_path, 1, value=0.5)
    monkeypatch.undo()
    assert "step-000001" not in _entries(tmp_path)  # set aside as .old-step-000001-*
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step-000001"
    assert load_checkpoint(path).extra == {"value": 0.0}  # the old one, whole
    assert _entries(tmp_path) == [".lock", "latest", "step-000001"]


# -- errors that teach ----------------------------------------------------------------------
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state"])
def test_corrupt_file_fails_loudly_and_names_the_previous_checkpoint(
    tmp_path: Path, damage: str
) -> None:
    first = _saved(tmp_path, 1)
    second = _saved(tmp_path, 2)
    target = second / ("state.json" if damage == "state" else "student.safetensors")
    if damage in ("flip", "state"):
        _flip_byte(target) if damage == "flip" else target.write_text("{not json")
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-3])
    else:
        target.unlink()
    with pytest.raises(CheckpointCorruptError) as info:
        load_checkpoint(second)
    msg = str(info.value)
    assert (
        str(target) in msg
        and f"resume from the previous checkpoint {first}" in msg
        and "\n" not in msg
    )
    assert isinstance(info.value, WadiError)
    want = {"flip": "sha256", "truncate": "bytes", "delete": "missing", "state": "unreadable"}[
        damage
    ]
    assert want in msg
    if damage != "flip":  # size-level damage makes the folder incomplete: latest falls back
        assert latest_checkpoint(tmp_path) == first


def test_first_checkpoint_corrupt_says_restart(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1)
    _flip_byte(path / "student.safetensors")
    with pytest.raises(
        CheckpointCorruptError, match="no earlier checkpoint exists: restart the run"
    ):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_tmp_mkdir(monkeypatch: pytest.MonkeyPatch, exc: OSError) -> None:
    real = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(".tmp-step-"):
            raise exc
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("where", ["fsync", "safetensors", "torch.save", "mkdir"])
def test_disk_full_raises_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    first = _saved(tmp_path, 1)
    if where == "mkdir":
        _fail_tmp_mkdir(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    else:
        targets = {
            "fsync": (os, "fsync"),
            "safetensors": (ck, "save_file"),
            "torch.save": (torch, "save"),
        }
        monkeypatch.setattr(*targets[where], _enospc)
    with pytest.raises(CheckpointSaveError) as info:
        _saved(tmp_path, 2)
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg
    assert (
        str(tmp_path / "checkpoints" / "step-000002") in msg
        and "previous checkpoint is intact" in msg
    )
    assert isinstance(info.value.__cause__, OSError)
    assert _entries(tmp_path) == [".lock", "latest", "step-000001"]  # no temp folder left
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(first).step == 1


def test_permission_error_is_a_save_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "checkpoints").mkdir()
    _fail_tmp_mkdir(monkeypatch, PermissionError(errno.EACCES, "Permission denied", str(tmp_path)))
    with pytest.raises(
        CheckpointSaveError, match="could not save checkpoint step 1 .*Permission denied"
    ):
        _saved(tmp_path, 1)


def test_step_folders_follow_the_umask_not_0o700(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        path = _saved(tmp_path, 1)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o755


# -- pruning and finding --------------------------------------------------------------------
def test_keep_prunes_older_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        _saved(tmp_path, step, keep=2)
    assert _entries(tmp_path) == [".lock", "latest", "step-000004", "step-000005"]
    _saved(tmp_path, 3, keep=2)  # resaving an older step keeps it (it is `latest`)
    assert _entries(tmp_path) == [".lock", "latest", "step-000003", "step-000004", "step-000005"]
    _saved(tmp_path, 9, keep=2)  # higher steps (an abandoned branch) were never pruned
    assert _entries(tmp_path) == [".lock", "latest", "step-000005", "step-000009"]
    for step in (10, 11):
        _saved(tmp_path, step, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-000005",
        "step-000009",
        "step-000010",
        "step-000011",
    ]
    with pytest.raises(ValueError, match="keep"):
        _saved(tmp_path, 12, keep=0)


def test_latest_falls_back_to_the_highest_complete_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (8, 9, 1000000):  # numeric, not lexical, order
        _saved(tmp_path, step, keep=None)
    latest = tmp_path / "checkpoints" / "latest"
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    latest.write_text("../../etc")
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    assert "does not name a complete checkpoint" in caplog.text
    (tmp_path / "checkpoints" / "step-1000000" / "rng.pt").touch()  # not listed: harmless
    (tmp_path / "checkpoints" / "step-1000000" / "optimizers.pt").unlink()
    latest.unlink()
    assert latest_checkpoint(tmp_path).name == "step-000009"
    (tmp_path / "checkpoints" / "step-000009" / "state.json").write_text("")
    assert latest_checkpoint(tmp_path).name == "step-000008"


def test_latest_checkpoint_waits_for_a_save_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved(tmp_path, 1)
    writing, release = threading.Event(), threading.Event()
    real_save = torch.save

    def slow_save(obj: Any, fh: Any) -> None:
        real_save(obj, fh)
        writing.set()
        release.wait(10)

    monkeypatch.setattr(torch, "save", slow_save)
    saver = threading.Thread(target=_saved, args=(tmp_path, 2))
    saver.start()
    assert writing.wait(10)
    found: list[Path | None] = []
    reader = threading.Thread(target=lambda: found.append(latest_checkpoint(tmp_path)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # blocked on the lock: it must not clean up the live .tmp folder
    release.set()
    saver.join(10)
    reader.join(10)
    assert found == [tmp_path / "checkpoints" / "step-000002"]


def test_misuse_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file stem"):
        save_checkpoint(tmp_path, 1, tensors={"../evil": {}})
    with pytest.raises(ValueError, match="step must be an int"):
        save_checkpoint(tmp_path, -1, tensors={})
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore_rng(load_checkpoint(_saved(tmp_path, 1)).rng)
    with pytest.raises(CheckpointError, match=r"generator\(s\) \['data'\]"):
        restore_rng(capture_rng(), {"data": torch.Generator()})
    path = _saved(tmp_path, 2)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "format_version": ck.FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="upgrade wadi_train"):
        load_checkpoint(path)


@pytest.mark.gpu
def test_cuda_rng_and_map_location_round_trip(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    model = nn.Linear(4, 4).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4, device=dev)).sum().backward()
    opt.step()
    gen = torch.Generator(device=dev).manual_seed(5)
    path = save_checkpoint(
        tmp_path,
        1,
        tensors={"m": dict(model.state_dict())},
        optimizers={"o": opt.state_dict()},
        rng=capture_rng({"g": gen}),
    )
    want = [torch.rand(3, device=dev), torch.rand(3, device=dev, generator=gen)]
    torch.cuda.manual_seed_all(0)
    gen.manual_seed(0)
    c = load_checkpoint(path, map_location=dev)
    assert c.tensors["m"]["weight"].device.type == "cuda" and c.rng["torch"].device.type == "cpu"
    restore_rng(c.rng, {"g": gen})
    got = [torch.rand(3, device=dev), torch.rand(3, device=dev, generator=gen)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    opt.load_state_dict(c.optimizers["o"])
    assert opt.state_dict()["state"][0]["exp_avg"].device.type == "cuda"


# -- SIGKILL during a save loop ---------------------------------------------------------------
# A small fork server imports torch once; for each round it forks a writer that resumes from
# `latest` and saves checkpoints in a loop until the test SIGKILLs it at a random moment.
FORK_SERVER = r"""
import os, sys
import torch
from wadi_train.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint

def write_forever(run):
    torch.set_num_threads(1)
    last = latest_checkpoint(run)
    step = load_checkpoint(last).step if last else 0
    first = True
    while True:
        step += 1
        w = torch.full((1 << 16,), float(step))
        save_checkpoint(run, step, tensors={"student": {"w": w}, "ema": {"w": 2 * w}},
                        optimizers={"student": {"state": {0: {"exp_avg": -w}}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
                        schedulers={"student": {"last_epoch": step}}, rng=capture_rng(), extra={"step": step}, keep=2)
        if first:
            print("saved", flush=True)
            first = False

for line in sys.stdin:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            write_forever(sys.argv[1])
        finally:
            os._exit(1)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("reaped", os.waitstatus_to_exitcode(status), flush=True)
"""


def _check_run(run_dir: Path) -> int:
    path = latest_checkpoint(run_dir)
    assert path is not None
    c = load_checkpoint(path)  # sizes and sha256 verified
    assert c.extra == {"step": c.step} and c.schedulers == {"student": {"last_epoch": c.step}}
    w = c.tensors["student"]["w"]
    assert torch.equal(w, torch.full((1 << 16,), float(c.step)))
    assert torch.equal(c.tensors["ema"]["w"], 2 * w)
    assert torch.equal(c.optimizers["student"]["state"][0]["exp_avg"], -w)
    names = _entries(run_dir)
    assert not [n for n in names if n.startswith((".tmp-", ".old-"))], names
    assert all(ck.is_complete(run_dir / "checkpoints" / n) for n in names if n.startswith("step-"))
    return c.step


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")
def test_sigkill_during_save_loop_always_leaves_a_loadable_latest(tmp_path: Path) -> None:
    rnd = random.Random(0)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    server = subprocess.Popen(
        [sys.executable, "-c", FORK_SERVER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    steps: list[int] = []
    try:
        for _ in range(6):
            server.stdin.write("go\n")
            server.stdin.flush()
            kind, pid = server.stdout.readline().split()
            assert kind == "pid"
            assert server.stdout.readline().strip() == "saved", (
                "the writer died before its first save"
            )
            time.sleep(rnd.uniform(0.0, 0.3))
            os.kill(int(pid), signal.SIGKILL)
            assert server.stdout.readline().split() == ["reaped", str(-signal.SIGKILL)]
            steps.append(_check_run(tmp_path))
    finally:
        server.kill()
        server.wait()
    assert all(b > a for a, b in itertools.pairwise(steps)), steps  # each writer got further
