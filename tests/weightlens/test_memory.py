"""The allocator setting that keeps `weightlens compare`'s memory flat in the number of layers."""

from __future__ import annotations

import platform
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
    monkeypatch.setattr(weightlens.memory, "bound_allocator", lambda threshold=1 << 20: calls.append(threshold) or True)
    save_file(unet_pair.teacher, tmp_path / "t.safetensors")
    save_file(unet_pair.student, tmp_path / "s.safetensors")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "out"), "--no-report", "-q"])
    assert result.exit_code == 0, result.output
    assert calls == [1 << 20]
