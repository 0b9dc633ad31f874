"""Two CPU processes (torchrun + gloo): adapters stay bit-identical on every rank; resume; export.

The recipe never DDP-wraps the model; it averages adapter gradients across processes by hand.
Each rank draws different noise, so identical adapters after every step show that the
all-reduce happened and that every rank applied the same update.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_config
from dist_worker import state_hash

from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
from wadi_train.config import from_dict
from wadi_train.export import export_run
from wadi_train.train import train

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 240


def _torchrun(config: Path, out: Path, cwd: Path) -> None:
    """Run the 2-rank worker; on failure or timeout, fail with its whole output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a session of its own, so a timeout can stop torchrun *and* its two workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{output}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{output}"


def _read_hashes(path: Path) -> list[tuple[int, str, str, int]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(step), adapters, rng, int(world)) for step, adapters, rng, world in rows]


def test_two_ranks_stay_identical_then_resume_on_one_and_export(tmp_path: Path, tiny_teacher: Path) -> None:
    from diffusers import UNet2DConditionModel

    cfg = tiny_config(tmp_path, tiny_teacher, train={"steps": 3, "checkpoint_every": 10})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    hashes = tmp_path / "hashes"
    _torchrun(config_path, hashes, tmp_path)

    rank0, rank1 = (_read_hashes(hashes / f"hashes-rank{r}.txt") for r in (0, 1))
    assert [row[0] for row in rank0] == [1, 2, 3] and [row[0] for row in rank1] == [1, 2, 3]
    assert all(row[3] == 2 for row in rank0 + rank1), "the workers did not form a 2-process group"
    for (step, a0, rng0, _), (_, a1, rng1, _) in zip(rank0, rank1):
        assert a0 == a1, f"step {step}: adapters differ between ranks"
        assert rng0 != rng1, f"step {step}: both ranks drew the same noise (the test would prove nothing)"
    assert len({row[1] for row in rank0}) == 3, "the adapters did not change every step"

    run = tmp_path / "run"
    ck = load_checkpoint(latest_checkpoint(run))
    assert ck.step == 3
    assert state_hash(ck.tensors["student"], ck.tensors["fake"]) == rank0[-1][1]

    # one more step in a single process, from the 2-process checkpoint
    cfg["train"]["steps"] = 4
    res = train(from_dict(cfg), resume=True)
    assert res.steps == 4
    assert [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]
    assert load_checkpoint(latest_checkpoint(run)).step == 4

    out = export_run(run, tmp_path / "export")
    model = UNet2DConditionModel.from_pretrained(out / "model")
    with torch.no_grad():
        y = model(torch.randn(2, 1, 8, 8), torch.tensor([999, 999]), encoder_hidden_states=None, class_labels=torch.tensor([1, 2])).sample
    assert y.shape == (2, 1, 8, 8) and torch.isfinite(y).all()
