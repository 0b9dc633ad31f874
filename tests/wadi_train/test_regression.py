"""The optional DMD-style regression term: teacher ODE pairs and their use in training."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler
from tiny import tiny_config

from wadi_train.config import from_dict, validate
from wadi_train.data import ClassSampler
from wadi_train.models import Cond
from wadi_train.regression import make_ode_pairs, regression_loss
from wadi_train.sampling import ddim_sample_fn
from wadi_train.train import train

SCHED = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)


def _zero_eps(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return torch.zeros_like(x)


def test_zero_eps_teacher_gives_the_closed_form_ddim_output() -> None:
    # eps = 0 makes each DDIM step x_prev = sqrt(abar_prev / abar_t) x_t, with trailing spacing
    # t = 999, 856, ..., 142 and prev = t - 1000 // 7 (diffusers' DDIM step rule).
    abar = DDPMScheduler.from_config(SCHED).alphas_cumprod.double()
    pairs = make_ode_pairs(_zero_eps, ClassSampler(10), 5, (1, 4, 4), SCHED, steps=7, guidance=1.5, seed=0)
    ts = [round(1000 - i * 1000 / 7) - 1 for i in range(7)]
    assert ts[0] == 999 and ts[-1] == 142
    scale = math.prod(math.sqrt(abar[t - 142] / abar[t]) for t in ts)
    expected = pairs.noise.double() * scale
    torch.testing.assert_close(pairs.target.double(), expected, rtol=1e-5, atol=1e-6)


def test_pairs_are_reproducible_and_rows_line_up() -> None:
    def teacher(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # depends on the class, so a row mix-up between noise, condition and target shows
        return 0.1 * x + 0.05 * cond.class_labels.float().view(-1, 1, 1, 1)

    sampler = ClassSampler(10)
    a = make_ode_pairs(teacher, sampler, 9, (1, 4, 4), SCHED, steps=3, guidance=2.0, seed=5, chunk=4)
    b = make_ode_pairs(teacher, sampler, 9, (1, 4, 4), SCHED, steps=3, guidance=2.0, seed=5, chunk=4)
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
    assert len(a) == 9 and a.cond.class_labels.shape == (9,)
    for i in (0, 4, 8):  # each row, recomputed alone, gives the same target
        one = ddim_sample_fn(teacher, a.noise[i : i + 1], a.cond.index(torch.tensor([i])), sampler.uncond(1), SCHED, 3, 2.0)
        torch.testing.assert_close(one, a.target[i : i + 1], rtol=1e-5, atol=1e-6)
    z, cond, target = a.batch(torch.tensor([2, 7]))
    assert torch.equal(z, a.noise[[2, 7]]) and torch.equal(cond.class_labels, a.cond.class_labels[[2, 7]]) and torch.equal(target, a.target[[2, 7]])


def test_regression_loss_is_the_mse_and_checks_shapes() -> None:
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss, diag = regression_loss(x, y)
    assert float(loss) == pytest.approx(float(((x - y) ** 2).mean()), rel=1e-6) and diag["loss"] == pytest.approx(float(loss))
    with pytest.raises(ValueError, match="shape"):
        regression_loss(x, y[:2])


def test_config_rejects_bad_regression_settings(tmp_path: Path, tiny_teacher: Path) -> None:
    bad = from_dict(tiny_config(tmp_path, tiny_teacher, vsd={"regression_weight": -1.0}))
    assert any("vsd.regression_weight" in p for p in validate(bad, check_files=False))
    bad = from_dict(tiny_config(tmp_path, tiny_teacher, vsd={"regression_weight": 1.0, "regression_pairs": 0, "regression_steps": 0}))
    problems = validate(bad, check_files=False)
    assert any("vsd.regression_pairs" in p for p in problems) and any("vsd.regression_steps" in p for p in problems)
    ok = from_dict(tiny_config(tmp_path, tiny_teacher, vsd={"regression_weight": 1.0}))
    assert validate(ok, check_files=False) == []


def test_regression_term_pulls_the_student_to_the_teacher_pairs(tmp_path: Path, tiny_teacher: Path) -> None:
    sections = {"train": {"steps": 12, "checkpoint_every": 12, "batch_size": 4}, "optim": {"student_lr": 3e-2}}
    pure = train(from_dict(tiny_config(tmp_path / "pure", tiny_teacher, **sections)))
    reg = train(from_dict(tiny_config(tmp_path / "reg", tiny_teacher, vsd={"regression_weight": 100.0, "regression_pairs": 16, "regression_steps": 4}, **sections)))
    m_pure, m_reg = pd.read_csv(pure.run_dir / "metrics.csv"), pd.read_csv(reg.run_dir / "metrics.csv")
    assert m_pure["loss_regression"].isna().all()  # pure VSD: no pairs, no term
    r = m_reg["loss_regression"]
    assert r.map(math.isfinite).all()
    assert r.iloc[-4:].mean() < 0.7 * r.iloc[:2].mean(), r.tolist()  # the term is optimised
