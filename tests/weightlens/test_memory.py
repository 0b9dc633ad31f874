"""The process-wide allocator settings that keep `weightlens compare`'s memory flat in model size."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

import weightlens.memory
from weightlens.cli import app


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_bound_allocator_applies_on_glibc() -> None:
    assert weightlens.memory.bound_allocator() is True
    assert weightlens.memory.bound_allocator(1 << 20) is True  # idempotent


def test_cli_compare_bounds_the_allocator(unet_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    monkeypatch.setattr(weightlens.memory, "bound_allocator", lambda threshold=weightlens.memory.MMAP_THRESHOLD: calls.append(threshold) or True)
    save_file(unet_pair.teacher, tmp_path / "t.safetensors")
    save_file(unet_pair.student, tmp_path / "s.safetensors")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "out"), "--no-report", "-q"])
    assert result.exit_code == 0, result.output
    assert calls == [weightlens.memory.MMAP_THRESHOLD]


def _mkl_setting(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('MKL_DISABLE_FAST_MM'))"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_importing_weightlens_first_disables_mkl_buffer_cache() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    assert _mkl_setting("import weightlens", env) == "1"
    assert _mkl_setting("import torch, weightlens", env) == "None"  # too late for MKL: left alone
    assert _mkl_setting("import weightlens", {**env, "MKL_DISABLE_FAST_MM": "0"}) == "0"  # the user's choice wins
