"""Integration: the recipe on a tiny U-Net on CPU (finite losses, frozen base, exact resume, export)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny import tiny_config

from wadi_train.config import from_dict
from wadi_train.errors import ConfigError
from wadi_train.models import Cond
from wadi_train.train import train


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint

    ck = load_checkpoint(latest_checkpoint(run))
    return {f"{g}/{k}": v for g, group in ck.tensors.items() for k, v in group.items()}


def test_four_steps_change_only_adapters(tmp_path: Path, tiny_teacher: Path) -> None:
    from safetensors.torch import load_file

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher))
    res = train(cfg)
    assert res.steps == 4 and res.nonfinite_skipped == 0
    metrics = pd.read_csv(res.run_dir / "metrics.csv")
    assert len(metrics) == 4
    assert metrics[["loss_student", "loss_fake", "grad_norm_student", "grad_norm_fake"]].map(math.isfinite).all().all()
    # at init fake == teacher, so the first VSD gradient is exactly zero; then the student moves
    assert metrics["theta_abs_mean"].iloc[0] == 0 and (metrics["theta_abs_mean"].iloc[1:] > 0).all()
    adapters = _adapters(res.run_dir)
    assert all(k.endswith((".theta_a", ".theta_b")) for k in adapters)
    assert any(float(v.abs().sum()) > 0 for k, v in adapters.items() if k.startswith("student/") and k.endswith("theta_a"))
    # the frozen base is bit-identical to the teacher file
    from wadi_train.export import export_run

    out = export_run(res.run_dir, tmp_path / "export")
    teacher = load_file(tiny_teacher)
    merged = load_file(next((out / "model").glob("*.safetensors")))
    changed = {k for k in teacher if not torch.equal(teacher[k], merged[k])}
    assert changed and all(".to_" in k or "time_emb_proj" in k for k in changed), changed
    assert all(k.endswith(".weight") for k in changed)  # biases, norms, convs untouched


def test_resume_is_bit_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    full = train(from_dict(tiny_config(tmp_path / "a", tiny_teacher)))
    cfg_b = from_dict(tiny_config(tmp_path / "b", tiny_teacher))
    half = train(cfg_b, stop_after=2)
    assert half.steps == 2
    resumed = train(cfg_b, resume=True)
    assert resumed.steps == 4
    a, b = _adapters(full.run_dir), _adapters(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_existing_run_needs_resume(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 1}))
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def test_export_loads_in_diffusers_and_matches_adapted_model(tmp_path: Path, tiny_teacher: Path) -> None:
    from diffusers import UNet2DConditionModel

    from wadi_train.adapters import build_roles
    from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
    from wadi_train.export import export_run
    from wadi_train.models import load_teacher

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 2}))
    res = train(cfg)
    out = export_run(res.run_dir, tmp_path / "export")
    exported = UNet2DConditionModel.from_pretrained(out / "model")
    roles = build_roles(load_teacher(cfg.model), cfg.adapter, cfg.fake)
    ck = load_checkpoint(latest_checkpoint(res.run_dir))
    roles.load_states(ck.tensors["student"], ck.tensors["fake"])
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([999, 500, 10])
    labels = torch.tensor([0, 5, 10])
    want = roles.predict("student", x, t, Cond(class_labels=labels))
    got = exported(x, t, encoder_hidden_states=None, class_labels=labels).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (out / "adapter.safetensors").is_file() and (out / "wadi_export.json").is_file()


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_baselines_train(method: str, tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, adapter={"method": method, "rank": 2}, train={"steps": 2}))
    res = train(cfg)
    assert math.isfinite(res.last["loss_student"]) and math.isfinite(res.last["loss_fake"])
    from wadi_train.export import export_run

    export_run(res.run_dir, tmp_path / "export")


def test_mixed_precision_bf16_cpu(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 2, "mixed_precision": "bf16"}))
    res = train(cfg)
    assert math.isfinite(res.last["loss_student"])
