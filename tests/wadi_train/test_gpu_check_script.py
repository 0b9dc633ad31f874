"""bench/gpu_check.sh: fails at once without CUDA, and its CPU toy path runs every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_fails_fast_with_one_line(tmp_path: Path) -> None:
    res = _run("--data", str(tmp_path), timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0] and "--device cpu --tiny" in lines[0], res.stderr
    assert not any(tmp_path.iterdir())  # nothing was built


def test_cpu_tiny_path_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    res = _run("--device", "cpu", "--tiny", "--steps", "2", "--data", str(tmp_path / "data"), "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "all checks passed" in res.stdout
    doc = json.loads(out.read_text())
    verdicts = {name: v for v, name, _ in doc["rows"]}
    for name in ("weightlens compare", "VSD no finite", "VSD bf16 finite", "LoRaD and LoRA steps", "generate --prompt 32 px", "generate --prompt 64 px"):
        assert verdicts.get(name) == "PASS", (name, doc["rows"])
    assert all(v in ("PASS", "MISS", "n/a") for v in verdicts.values())
    figures = doc["figures"]
    assert figures["weightlens"]["layers"] > 0 and figures["weightlens"]["compare_s"] > 0
    for precision in ("no", "bf16"):
        vsd = figures[f"vsd_{precision}"]
        assert vsd["steps"] == 2 and len(vsd["loss_student"]) == 2 and vsd["median_step_s"] > 0
    assert figures["lorad_vs_lora"]["ratio"] > 0
    assert set(figures["stage_s"]) == {"weightlens", "pipeline", "vsd no", "vsd bf16", "lora", "generate"}
