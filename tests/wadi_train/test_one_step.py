"""Noise-schedule maths and the one-step generator: NumPy references, diffusers agreement,
round trips over all prediction types, exact recovery of a planted x0."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from wadi_train.one_step import (
    PREDICTION_TYPES,
    abar_at,
    add_noise,
    cfg,
    eps_from_prediction,
    one_step_x0,
    prediction_target,
    sample_timesteps,
    x0_from_prediction,
)

TYPES = list(PREDICTION_TYPES)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(num_train_timesteps=1000).alphas_cumprod


def _sd_scheduler() -> DDPMScheduler:
    # Stable Diffusion's schedule (scaled_linear, 0.00085 -> 0.012).
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )


# ---------------------------------------------------------------------------------- abar_at


def test_abar_at_gathers_and_shapes() -> None:
    table = torch.tensor([0.9, 0.5, 0.25, 0.1], dtype=torch.float64)
    a = abar_at(table, torch.tensor([0, 3, 2]))
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32
    np.testing.assert_allclose(a.flatten().numpy(), [0.9, 0.1, 0.25], rtol=1e-7)
    assert abar_at(table, torch.tensor([1, 1]), ndim=2).shape == (2, 1)
    assert abar_at(table, torch.tensor([1]), ndim=1).shape == (1,)
    assert abar_at(table, torch.tensor(2), ndim=3).shape == (1, 1, 1)  # 0-d t: B = 1


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.tensor([0.5]), "integer"),
        (torch.tensor([4]), r"\[0, 3\]"),
        (torch.tensor([-1]), r"\[0, 3\]"),
    ],
)
def test_abar_at_rejects_bad_timesteps(t: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        abar_at(torch.tensor([0.9, 0.5, 0.25, 0.1]), t)


def test_sd_schedule_last_abar_is_not_zero() -> None:
    a = abar_at(_sd_scheduler().alphas_cumprod, torch.tensor([999]))
    assert 0.004 < float(a) < 0.0055  # ~0.0047: the reason one_step_x0 never assumes abar_T = 0


# ------------------------------------------------------------------ formulas vs hand values

X0 = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])  # (B=2, 3)
NOISE = np.array([[0.5, 1.0, -1.5], [2.0, -0.25, 0.75]])
PRED = np.array([[0.2, -0.4, 1.0], [-1.0, 0.3, 0.6]])
ABAR = np.array([[0.25], [0.64]])  # (B, 1): sqrt = 0.5, 0.8; sqrt(1 - abar) = sqrt(.75), 0.6


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def test_add_noise_hand_values() -> None:
    # row 0: 0.5 * x0 + sqrt(0.75) * noise; row 1: 0.8 * x0 + 0.6 * noise
    s = np.sqrt(0.75)
    expected = np.array(
        [[0.5 + s * 0.5, -1.0 + s * 1.0, 0.25 - s * 1.5], [1.2, 2.4 - 0.15, -0.8 + 0.45]]
    )
    out = add_noise(_t(X0), _t(NOISE), _t(ABAR))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def _numpy_reference(kind: str, ptype: str) -> np.ndarray:
    sa, sb = np.sqrt(ABAR), np.sqrt(1 - ABAR)
    xt = sa * X0 + sb * NOISE
    table = {
        ("x0", "epsilon"): (xt - sb * PRED) / sa,
        ("x0", "v_prediction"): sa * xt - sb * PRED,
        ("x0", "sample"): PRED,
        ("eps", "epsilon"): PRED,
        ("eps", "v_prediction"): sa * PRED + sb * xt,
        ("eps", "sample"): (xt - sa * PRED) / sb,
        ("target", "epsilon"): NOISE,
        ("target", "v_prediction"): sa * NOISE - sb * X0,
        ("target", "sample"): X0,
    }
    return table[(kind, ptype)]


@pytest.mark.parametrize("ptype", TYPES)
def test_conversions_match_numpy(ptype: str) -> None:
    xt = add_noise(_t(X0), _t(NOISE), _t(ABAR))
    for kind, fn, args in [
        ("x0", x0_from_prediction, (_t(PRED), xt)),
        ("eps", eps_from_prediction, (_t(PRED), xt)),
        ("target", prediction_target, (_t(X0), _t(NOISE))),
    ]:
        out = fn(*args, _t(ABAR), ptype)
        np.testing.assert_allclose(
            out.numpy(), _numpy_reference(kind, ptype), rtol=1e-12, atol=1e-12, err_msg=kind
        )


def test_hand_value_spot_checks() -> None:
    # abar = 0.64, x_t = 1, pred = 0.5 -> eps: x0 = (1 - 0.6*0.5)/0.8 = 0.875; v: 0.8 - 0.3 = 0.5
    one, half, a = torch.ones(1, 1), torch.full((1, 1), 0.5), torch.full((1, 1), 0.64)
    assert float(x0_from_prediction(half, one, a, "epsilon")) == pytest.approx(0.875)
    assert float(x0_from_prediction(half, one, a, "v_prediction")) == pytest.approx(0.5)
    # v: eps = 0.8*0.5 + 0.6*1 = 1.0; sample: eps = (1 - 0.8*0.5)/0.6 = 1.0
    assert float(eps_from_prediction(half, one, a, "v_prediction")) == pytest.approx(1.0)
    assert float(eps_from_prediction(half, one, a, "sample")) == pytest.approx(1.0)


def test_float32_inputs_give_float32() -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    a = torch.full((2, 1, 1, 1), 0.5)
    assert add_noise(x, x, a).dtype == torch.float32
    assert x0_from_prediction(x, x, a, "epsilon").dtype == torch.float32


# --------------------------------------------------------------- diffusers agreement, trips


def test_add_noise_matches_diffusers(alphas_cumprod: torch.Tensor) -> None:
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    ours = add_noise(x0, noise, abar_at(alphas_cumprod, t))
    torch.testing.assert_close(ours, sched.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_v_target_matches_diffusers_get_velocity(alphas_cumprod: torch.Tensor) -> None:
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 250, 750, 999])
    ours = prediction_target(x0, noise, abar_at(alphas_cumprod, t), "v_prediction")
    torch.testing.assert_close(ours, sched.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
@pytest.mark.parametrize("ptype", TYPES)
def test_round_trips(
    alphas_cumprod: torch.Tensor, ptype: str, dtype: torch.dtype, tol: float
) -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=dtype)
    noise = torch.randn(5, 2, 4, 4, generator=g, dtype=dtype)
    abar = abar_at(alphas_cumprod, torch.tensor([0, 1, 499, 998, 999]))
    xt = add_noise(x0, noise, abar)
    target = prediction_target(x0, noise, abar, ptype)
    torch.testing.assert_close(x0_from_prediction(target, xt, abar, ptype), x0, rtol=tol, atol=tol)
    torch.testing.assert_close(
        eps_from_prediction(target, xt, abar, ptype), noise, rtol=tol, atol=tol
    )


# ---------------------------------------------------------------------------- one_step_x0


@pytest.mark.parametrize("sched", ["linear", "sd"])
@pytest.mark.parametrize("ptype", TYPES)
def test_one_step_x0_recovers_planted_x0(ptype: str, sched: str) -> None:
    table = (
        DDPMScheduler(num_train_timesteps=1000) if sched == "linear" else _sd_scheduler()
    ).alphas_cumprod
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    abar_T = abar_at(table, torch.full((3,), 999))
    x_T = add_noise(x0, eps, abar_T)
    seen: list[torch.Tensor] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        torch.testing.assert_close(x_t, x_T, rtol=0, atol=0)
        return prediction_target(x0, eps, abar_T, ptype)  # the true output of a perfect model

    x0_hat = one_step_x0(oracle, x_T, table, ptype)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    (t,) = seen
    assert t.dtype == torch.long and t.tolist() == [999, 999, 999]


def test_one_step_x0_custom_timestep_and_gradient(alphas_cumprod: torch.Tensor) -> None:
    weight = torch.tensor(0.5, requires_grad=True)
    noise = torch.randn(2, 1, 2, 2)
    seen: list[int] = []

    def student(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(t.tolist())
        return weight * x_t

    x0_hat = one_step_x0(student, noise, alphas_cumprod, "epsilon", timestep=500)
    assert seen == [500, 500]
    a = float(alphas_cumprod[500])
    expected = (1 - np.sqrt(1 - a) * 0.5) / np.sqrt(a) * noise.numpy()
    np.testing.assert_allclose(x0_hat.detach().numpy(), expected, rtol=1e-5)
    x0_hat.sum().backward()  # gradients reach the student
    assert weight.grad is not None and torch.isfinite(weight.grad)


def test_one_step_x0_rejects_bad_inputs(alphas_cumprod: torch.Tensor) -> None:
    noise = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        one_step_x0(lambda x, t: x, noise, alphas_cumprod, "epsilon", timestep=1000)
    with pytest.raises(ValueError, match="must match"):
        one_step_x0(lambda x, t: x[:1], noise, alphas_cumprod, "epsilon")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda x, a: x0_from_prediction(x, x, a, "eps"),
        lambda x, a: eps_from_prediction(x, x, a, "flow"),
        lambda x, a: prediction_target(x, x, a, "v"),
        lambda x, a: one_step_x0(lambda y, t: y, x, torch.ones(10), "x0"),
    ],
)
def test_unknown_prediction_type_names_valid_ones(
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    x, a = torch.zeros(2, 3), torch.full((2, 1), 0.5)
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction', 'sample'"):
        call(x, a)


def test_misshaped_abar_is_rejected() -> None:
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"abar_at\(alphas_cumprod, t, ndim=4\)"):
        add_noise(x, x, torch.full((2,), 0.5))  # (B,) would broadcast along W
    assert add_noise(x, x, torch.tensor(0.5)).shape == x.shape  # a scalar is fine


# ------------------------------------------------------------------ sample_timesteps, cfg


def test_sample_timesteps_bounds_inclusive() -> None:
    t = sample_timesteps(4000, 20, 23, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000,)
    assert set(t.tolist()) == {20, 21, 22, 23}
    assert sample_timesteps(5, 7, 7).tolist() == [7] * 5


def test_sample_timesteps_reproducible() -> None:
    a = sample_timesteps(64, 20, 980, generator=torch.Generator().manual_seed(42))
    b = sample_timesteps(64, 20, 980, generator=torch.Generator().manual_seed(42))
    c = sample_timesteps(64, 20, 980, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 20 and int(a.max()) <= 980


@pytest.mark.parametrize("low, high, batch", [(5, 4, 1), (-1, 4, 1), (0, 4, -1)])
def test_sample_timesteps_rejects_bad_args(low: int, high: int, batch: int) -> None:
    with pytest.raises(ValueError):
        sample_timesteps(batch, low, high)


def test_cfg_hand_values() -> None:
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg(u, c, 1.5), torch.tensor([4.0, 1.0]))  # u + 1.5 (c - u)
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)
