"""VSD and denoising losses: NumPy references, the autograd gradient of the surrogate, the
weighting registry, NaN handling and input validation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from wadi_train.losses import (
    WEIGHTINGS,
    denoising_loss,
    fake_score_loss,
    get_weighting,
    register_weighting,
    vsd_student_loss,
)

NP_WEIGHTS = {
    "one_minus_abar": lambda a: 1 - a,
    "constant": lambda a: np.ones_like(a),
    "sqrt_one_minus_abar": lambda a: np.sqrt(1 - a),
}


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0_hat = torch.randn(3, 2, 4, 4, generator=g)
    eps_t = torch.randn(3, 2, 4, 4, generator=g)
    eps_f = torch.randn(3, 2, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.01]).reshape(3, 1, 1, 1)
    return x0_hat, eps_t, eps_f, abar


# ---------------------------------------------------------------------------- weightings


def test_registry_has_the_documented_weightings() -> None:
    assert {"one_minus_abar", "constant", "sqrt_one_minus_abar"} <= set(WEIGHTINGS)
    abar = torch.tensor([0.36, 0.0, 1.0])
    torch.testing.assert_close(get_weighting("one_minus_abar")(abar), torch.tensor([0.64, 1, 0]))
    torch.testing.assert_close(get_weighting("constant")(abar), torch.ones(3))
    torch.testing.assert_close(
        get_weighting("sqrt_one_minus_abar")(abar), torch.tensor([0.8, 1, 0])
    )


def test_register_weighting_adds_and_rejects_duplicates() -> None:
    try:

        @register_weighting("test_abar")
        def _w(abar: torch.Tensor) -> torch.Tensor:
            return abar

        assert get_weighting("test_abar") is _w
        x0_hat, eps_t, eps_f, abar = _inputs()
        _, diag = vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting="test_abar")
        assert diag["weight_mean"] == pytest.approx((0.9 + 0.5 + 0.01) / 3)
        with pytest.raises(ValueError, match="already registered"):
            register_weighting("test_abar")(_w)
    finally:
        WEIGHTINGS.pop("test_abar", None)


def test_unknown_weighting_names_the_valid_ones() -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    with pytest.raises(ValueError, match="'constant', 'dmd', 'one_minus_abar', 'sqrt_one_minus_abar'"):
        vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting="snr")


# ------------------------------------------------------------------------ vsd_student_loss


@pytest.mark.parametrize("weighting", sorted(NP_WEIGHTS))
def test_vsd_gradient_is_weighted_score_difference(weighting: str) -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    x0_hat.requires_grad_(True)
    loss, diag = vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting=weighting)
    loss.backward()

    a = abar.double().numpy()
    grad = NP_WEIGHTS[weighting](a) * (eps_t.double().numpy() - eps_f.double().numpy())
    assert x0_hat.grad is not None
    np.testing.assert_allclose(x0_hat.grad.numpy(), grad / grad.size, rtol=1e-5, atol=1e-9)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert float(loss.detach()) == pytest.approx(0.5 * np.mean(grad**2), rel=1e-5)
    assert diag["loss"] == pytest.approx(float(loss.detach()))
    per_sample = np.sqrt((grad.reshape(3, -1) ** 2).sum(axis=1))
    assert diag["grad_norm"] == pytest.approx(per_sample.mean(), rel=1e-5)
    assert diag["weight_mean"] == pytest.approx(NP_WEIGHTS[weighting](a).mean(), rel=1e-6)
    assert diag["grad_nonfinite"] == 0


def test_dmd_weighting_normalises_each_sample_in_x0_space() -> None:
    """DMD (Yin et al. 2024, eq. 8) in x0 space: (x0_fake - x0_real) / mean|x0_hat - x0_real|
    with x0_e = (x_t - sigma eps_e) / alpha, computed here from x_t; the surrogate's gradient
    must be that divided by numel."""
    x0_hat, eps_t, eps_f, abar = _inputs(2)
    noise = torch.randn(x0_hat.shape, generator=torch.Generator().manual_seed(9))
    x0_hat.requires_grad_(True)
    loss, diag = vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting="dmd", noise=noise)
    loss.backward()

    a, x0, n = abar.double().numpy(), x0_hat.detach().double().numpy(), noise.double().numpy()
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    x_t = alpha * x0 + sigma * n
    x0_real = (x_t - sigma * eps_t.double().numpy()) / alpha
    x0_fake = (x_t - sigma * eps_f.double().numpy()) / alpha
    norm = np.abs(x0 - x0_real).mean(axis=(1, 2, 3), keepdims=True)
    grad_x0 = (x0_fake - x0_real) / norm
    assert x0_hat.grad is not None
    np.testing.assert_allclose(x0_hat.grad.numpy(), grad_x0 / grad_x0.size, rtol=1e-4, atol=1e-9)
    assert diag["weight_mean"] > 0
    with pytest.raises(ValueError, match="needs the noise"):
        vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting="dmd")


def test_vsd_default_weighting_is_one_minus_abar() -> None:
    x0_hat, eps_t, eps_f, abar = _inputs(1)
    default, _ = vsd_student_loss(x0_hat, eps_t, eps_f, abar)
    explicit, _ = vsd_student_loss(x0_hat, eps_t, eps_f, abar, weighting="one_minus_abar")
    assert torch.equal(default, explicit)


def test_vsd_equal_scores_give_zero_gradient() -> None:
    x0_hat, eps_t, _, abar = _inputs()
    x0_hat.requires_grad_(True)
    loss, diag = vsd_student_loss(x0_hat, eps_t, eps_t.clone(), abar)
    loss.backward()
    assert float(loss.detach()) == 0 and diag["grad_norm"] == 0
    assert x0_hat.grad is not None and not x0_hat.grad.any()


def test_vsd_low_precision_student_gets_float32_loss() -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    x0_hat = x0_hat.bfloat16().requires_grad_(True)
    loss, _ = vsd_student_loss(x0_hat, eps_t.half(), eps_f.half(), abar)
    loss.backward()
    assert loss.dtype == torch.float32
    assert x0_hat.grad is not None and x0_hat.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_vsd_nonfinite_eps_gives_finite_loss(bad: float, caplog: pytest.LogCaptureFixture) -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    eps_t[0, 0, 0, 0] = bad
    eps_f[1, 1, 2, 3] = float("nan")
    x0_hat.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="wadi_train.losses"):
        loss, diag = vsd_student_loss(x0_hat, eps_t, eps_f, abar)
    loss.backward()
    assert torch.isfinite(loss) and np.isfinite(diag["grad_norm"])
    assert x0_hat.grad is not None and torch.isfinite(x0_hat.grad).all()
    assert x0_hat.grad[0, 0, 0, 0] == 0 and x0_hat.grad[1, 1, 2, 3] == 0
    assert diag["grad_nonfinite"] == 2
    assert "non-finite" in caplog.text


def test_vsd_rejects_eps_with_grad() -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    with pytest.raises(ValueError, match="eps_fake requires grad.*no_grad"):
        vsd_student_loss(x0_hat, eps_t, eps_f.requires_grad_(True), abar)
    with pytest.raises(ValueError, match="eps_teacher requires grad"):
        vsd_student_loss(x0_hat, eps_t.requires_grad_(True), eps_f.detach(), abar)


def test_vsd_rejects_bad_shapes() -> None:
    x0_hat, eps_t, eps_f, abar = _inputs()
    with pytest.raises(ValueError, match="one shape"):
        vsd_student_loss(x0_hat, eps_t[:2], eps_f, abar)
    with pytest.raises(ValueError, match="abar"):
        vsd_student_loss(x0_hat, eps_t, eps_f, abar.flatten())  # (B,) vs (B, C, H, W)


# ----------------------------------------------------------------------- denoising_loss

_SA, _SB = np.sqrt(0.64), np.sqrt(0.36)  # 0.8, 0.6


@pytest.mark.parametrize(
    "ptype, target",
    [
        ("epsilon", lambda x0, n: n),
        ("v_prediction", lambda x0, n: _SA * n - _SB * x0),
        ("sample", lambda x0, n: x0),
    ],
)
def test_denoising_loss_matches_numpy(
    ptype: str, target: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> None:
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    x0 = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    abar = torch.full((2, 1, 1, 1), 0.64)
    loss, diag = denoising_loss(pred, x0, noise, abar, ptype)
    loss.backward()

    tgt = target(x0.detach().double().numpy(), noise.double().numpy())
    diff = pred.detach().double().numpy() - tgt
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert float(loss.detach()) == pytest.approx(np.mean(diff**2), rel=1e-5)
    assert diag == {"loss": pytest.approx(float(loss.detach()))}
    assert pred.grad is not None
    np.testing.assert_allclose(pred.grad.numpy(), 2 * diff / diff.size, rtol=1e-4, atol=1e-8)
    assert x0.grad is None  # the target is a constant (stopgrad(x0_hat) for the fake score)


def test_fake_score_loss_is_denoising_loss() -> None:
    assert fake_score_loss is denoising_loss


def test_denoising_loss_rejects_bad_inputs() -> None:
    x = torch.zeros(2, 3, 4, 4)
    abar = torch.full((2, 1, 1, 1), 0.5)
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction', 'sample'"):
        denoising_loss(x, x, x, abar, "eps")
    with pytest.raises(ValueError, match="one shape"):
        denoising_loss(x[:1], x, x, abar, "epsilon")
