"""Recipe options: gradient accumulation, checkpointing, sample grids, non-finite steps, prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

import wadi_train.train as train_mod
from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
from wadi_train.config import from_dict
from wadi_train.data import read_prompts
from wadi_train.errors import TrainingError


def test_accumulation_checkpointing_and_samples(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 2, "grad_accum": 2, "gradient_checkpointing": True, "sample_every": 1, "num_samples": 4}))
    res = train_mod.train(cfg)
    assert math.isfinite(res.last["loss_student"])
    grids = sorted((res.run_dir / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    from PIL import Image

    assert Image.open(grids[0]).size[0] > 8


def test_nonfinite_losses_skip_then_stop_keeping_last_good_checkpoint(tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_mod.vsd_student_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        loss, diag = real(*args, **kwargs)
        return (loss * float("nan"), diag) if calls["n"] > 1 else (loss, diag)

    monkeypatch.setattr(train_mod, "vsd_student_loss", flaky)
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, train={"steps": 10, "checkpoint_every": 1, "max_nonfinite_steps": 3}))
    with pytest.raises(TrainingError, match="3 consecutive non-finite"):
        train_mod.train(cfg)
    ck = load_checkpoint(latest_checkpoint(cfg.output_dir))
    assert all(torch.isfinite(v).all() for v in ck.tensors["student"].values())
    assert ck.step >= 1


def test_read_prompts_formats(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "a cat"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.csv", column="caption") == ["a cat", "a dog"]
    from wadi_train.errors import ConfigError

    with pytest.raises(ConfigError, match="column"):
        read_prompts(tmp_path / "p.csv", column="text")


@pytest.mark.parametrize("method", ["lorad", "lora", "full"])
def test_fake_score_reaches_the_convs_with_include_conv(method: str, tmp_path: Path, tiny_teacher: Path) -> None:
    from wadi_train.adapters import build_roles
    from wadi_train.config import BLOCK_LINEARS
    from wadi_train.models import load_teacher

    def fake_names(include_conv: bool) -> list[str]:
        fake = {"rank": 2, "include_conv": include_conv, "target_modules": BLOCK_LINEARS}
        cfg = from_dict(tiny_config(tmp_path, tiny_teacher, adapter={"method": method, "rank": 2}, fake=fake))
        return list(build_roles(load_teacher(cfg.model, "cpu"), cfg.adapter, cfg.fake).fake_state())

    with_convs, without = fake_names(True), fake_names(False)
    assert any(".conv1." in n for n in with_convs), with_convs[:5]
    assert not any(".conv1." in n for n in without) and len(without) < len(with_convs)


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_vsd_forward_trains_the_fake_score_on_vsds_own_prediction(reuse: bool, tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With fake.reuse_vsd_forward the fake score runs once per step, at VSD's timesteps, and
    its logged denoising loss is exactly the MSE of the eps_fake VSD used against VSD's noise."""
    seen: dict[str, torch.Tensor] = {}
    real_loss = train_mod.vsd_student_loss

    def spy(x0_hat, eps_t, eps_f, abar, weighting, noise):  # type: ignore[no-untyped-def]
        seen.update(eps_f=eps_f.detach().clone(), noise=noise.detach().clone())
        return real_loss(x0_hat, eps_t, eps_f, abar, weighting, noise)

    monkeypatch.setattr(train_mod, "vsd_student_loss", spy)
    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, fake={"rank": 2, "reuse_vsd_forward": reuse}, vsd={"fake_cfg": 1.0, "t_min": 500, "t_max": 500, "fake_t_min": 3, "fake_t_max": 3}, train={"steps": 1, "ema_decay": None}))
    d = train_mod.Distiller(cfg, __import__("accelerate").Accelerator(cpu=True), tmp_path / "run")
    calls: list[tuple[str, int]] = []
    predict = d.roles.predict

    def counting(role, x, t, cond):  # type: ignore[no-untyped-def]
        calls.append((role, int(t[0])))
        return predict(role, x, t, cond)

    d.roles.predict = counting  # type: ignore[method-assign]
    metrics = d.train_step()
    fake_calls = [t for role, t in calls if role == "fake"]
    mse = float(((seen["eps_f"] - seen["noise"]) ** 2).mean())
    if reuse:
        assert fake_calls == [500]
        assert metrics["loss_fake"] == pytest.approx(mse, rel=1e-6)
    else:
        assert fake_calls == [500, 3]
        assert metrics["loss_fake"] != pytest.approx(mse, rel=1e-3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.roles.fake_parameters())


def test_reuse_vsd_forward_refuses_a_guided_fake_score(tmp_path: Path, tiny_teacher: Path) -> None:
    from wadi_train.config import validate
    from wadi_train.errors import ConfigError

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, fake={"rank": 2, "reuse_vsd_forward": True}, vsd={"fake_cfg": 1.5}))
    problems = validate(cfg)
    assert any("fake.reuse_vsd_forward needs vsd.fake_cfg = 1" in p for p in problems), problems


def test_reuse_vsd_forward_gives_the_same_fake_gradients_under_gradient_checkpointing(tmp_path: Path, tiny_teacher: Path) -> None:
    """The shared fake forward is backpropagated after the student's backward: checkpointed
    blocks must recompute it with the fake adapter, not the student's."""
    from accelerate import Accelerator

    grads = []
    for ckpt in (False, True):
        cfg = from_dict(tiny_config(tmp_path, tiny_teacher, fake={"rank": 2, "reuse_vsd_forward": True}, vsd={"fake_cfg": 1.0}, train={"steps": 1, "ema_decay": None, "gradient_checkpointing": ckpt}))
        d = train_mod.Distiller(cfg, Accelerator(cpu=True), tmp_path / f"run{ckpt}")
        for p in d.roles.student_parameters():  # a student that differs from the fake score
            torch.nn.init.normal_(p, std=0.3)
        d.opt_f.step = lambda *a, **k: None  # keep the gradients, skip the update
        d.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in d.roles.fake_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
