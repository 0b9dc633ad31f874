"""Losses of VSD one-step distillation (SwiftBrush, WaDi; DESIGN §5) and of denoiser training.

The student loss is variational score distillation in its surrogate form: with
grad = w(abar_t) (eps_teacher - eps_fake), minimising 0.5 * mse(x0_hat, stopgrad(x0_hat - grad))
gives d loss / d x0_hat = grad / numel, i.e. the VSD gradient (Wang et al. 2023, ProlificDreamer
eq. 9; SwiftBrush, Nguyen & Tran 2024, eq. 6) pushed into the student through autograd. The
weighting w is a registry entry, so configs name it and new ones are added with
``@register_weighting``. The fake score (and a teacher) train with the plain denoising MSE.
Losses take tensors, not models, compute in float32 and return ``(loss, diagnostics)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from wadi_train.one_step import prediction_target

__all__ = [
    "WEIGHTINGS",
    "denoising_loss",
    "fake_score_loss",
    "get_weighting",
    "register_weighting",
    "vsd_student_loss",
    "weighting_names",
]

logger = logging.getLogger(__name__)

Weighting = Callable[[Tensor], Tensor]

WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str) -> Callable[[Weighting], Weighting]:
    """Decorator that registers a VSD weighting ``abar -> w`` under ``name`` in ``WEIGHTINGS``.

    Args:
        name: Key used in configs (``weighting=...``).

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(fn: Weighting) -> Weighting:
        if name in WEIGHTINGS:
            raise ValueError(f"weighting {name!r} is already registered ({WEIGHTINGS[name]!r})")
        WEIGHTINGS[name] = fn
        return fn

    return decorator


@register_weighting("one_minus_abar")
def _one_minus_abar(abar: Tensor) -> Tensor:
    """w = 1 - abar, the SwiftBrush/WaDi default (small weight at low noise)."""
    return 1 - abar


@register_weighting("constant")
def _constant(abar: Tensor) -> Tensor:
    """w = 1."""
    return torch.ones_like(abar)


@register_weighting("sqrt_one_minus_abar")
def _sqrt_one_minus_abar(abar: Tensor) -> Tensor:
    """w = sqrt(1 - abar), the noise standard deviation sigma_t."""
    return (1 - abar).sqrt()


# DMD's normalised weighting (Yin et al. 2024, eq. 8) needs the sample, not just abar: its x0-space
# gradient (x0_fake - x0_real) / mean|x0_hat - x0_real| is, in eps form,
# (eps_teacher - eps_fake) / mean|eps_teacher - noise| per sample (the sigma/alpha factors cancel).
SAMPLE_WEIGHTINGS = ("dmd",)


def weighting_names() -> list[str]:
    """Every name `vsd_student_loss` accepts: the registry's and the sample weightings, sorted."""
    return sorted([*WEIGHTINGS, *SAMPLE_WEIGHTINGS])


def get_weighting(name: str) -> Weighting:
    """Look up a registered weighting.

    Args:
        name: A key of ``WEIGHTINGS``.

    Returns:
        The function ``abar -> w``.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the registered names.
    """
    if name not in WEIGHTINGS:
        raise ValueError(
            f"unknown weighting {name!r}; expected one of {', '.join(map(repr, weighting_names()))}"
            " (add one with @register_weighting)"
        )
    return WEIGHTINGS[name]


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise a ValueError if the named tensors do not all have one shape (no silent broadcast)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def vsd_student_loss(
    x0_hat: Tensor,
    eps_teacher: Tensor,
    eps_fake: Tensor,
    abar: Tensor,
    weighting: str = "one_minus_abar",
    noise: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """VSD loss of the one-step student (SwiftBrush/WaDi surrogate form).

    grad = w(abar) (eps_teacher - eps_fake), non-finite entries zeroed with a warning
    (``torch.nan_to_num`` with posinf/neginf also set to 0, so one overflow cannot make the loss
    infinite); loss = 0.5 * mse(x0_hat, stopgrad(x0_hat - grad)), mean reduction, so
    d loss / d x0_hat = grad / x0_hat.numel(). The loss value itself is 0.5 * mean(grad^2), a
    diagnostic only: what matters is its gradient.

    Args:
        x0_hat: The student's output, (B, C, H, W) (any (B, ...)), with grad.
        eps_teacher: Teacher's (CFG) eps at x_t = add_noise(x0_hat, noise, abar), same shape.
            Must not require grad: compute it under ``torch.no_grad()``.
        eps_fake: Fake score's eps at the same x_t, same shape, also without grad.
        abar: abar_t, a scalar or (B, 1, ..., 1) (see ``one_step.abar_at``).
        weighting: Name of a registered weighting (``WEIGHTINGS``) or ``dmd``: DMD's
            normalised weighting, 1 / mean|eps_teacher - noise| per sample.
        noise: The noise that made x_t (needed by ``dmd`` only).

    Returns:
        The scalar float32 loss and diagnostics: ``loss``, ``grad_norm`` (mean over the batch
        of the per-sample L2 norm of grad), ``weight_mean`` and ``grad_nonfinite`` (count of
        entries zeroed).

    Raises:
        ValueError: For an unknown weighting, mismatched shapes, or eps inputs that require grad.
    """
    if weighting in SAMPLE_WEIGHTINGS:
        if noise is None:
            raise ValueError(f"weighting {weighting!r} needs the noise that made x_t (noise=...)")
        _check_same_shape(noise=noise, eps_teacher=eps_teacher)
        dims = tuple(range(1, eps_teacher.ndim))
        scale = (eps_teacher.float() - noise.float()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        weight_fn = lambda _abar: 1 / scale  # noqa: E731
    else:
        weight_fn = get_weighting(weighting)
    _check_same_shape(x0_hat=x0_hat, eps_teacher=eps_teacher, eps_fake=eps_fake)
    for name, eps in (("eps_teacher", eps_teacher), ("eps_fake", eps_fake)):
        if eps.requires_grad:
            raise ValueError(
                f"{name} requires grad; the VSD gradient must not flow into the teacher or the "
                "fake score. Compute it under torch.no_grad() (or pass .detach())."
            )
    if x0_hat.ndim < 1:
        raise ValueError("x0_hat must have a batch dim, (B, ...); got a 0-d tensor")
    if abar.ndim not in (0, x0_hat.ndim):
        raise ValueError(
            f"abar has shape {tuple(abar.shape)}; it must be a scalar or have {x0_hat.ndim} dims "
            f"to broadcast against x0_hat {tuple(x0_hat.shape)}"
        )
    w = weight_fn(abar.float())  # (B, 1, 1, 1)
    grad = w * (eps_teacher.float() - eps_fake.float())  # (B, C, H, W)
    nonfinite = int((~torch.isfinite(grad)).sum())
    if nonfinite:
        logger.warning("VSD gradient has %d non-finite entries; zeroed by nan_to_num", nonfinite)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    x0 = x0_hat.float()
    target = (x0 - grad).detach()
    loss = 0.5 * F.mse_loss(x0, target, reduction="mean")
    grad_norm = grad.detach().reshape(grad.shape[0], -1).norm(dim=1).mean()  # mean_b ||grad_b||
    diagnostics = {
        "loss": float(loss.detach()),
        "grad_norm": float(grad_norm),
        "weight_mean": float(w.mean()),
        "grad_nonfinite": float(nonfinite),
    }
    return loss, diagnostics


def denoising_loss(
    pred: Tensor, x0: Tensor, noise: Tensor, abar: Tensor, prediction_type: str
) -> tuple[Tensor, dict[str, float]]:
    """Denoising MSE: the DDPM training loss of a teacher, and the fake score's loss in VSD.

    The target is ``prediction_target(x0, noise, abar, prediction_type)`` with ``x0`` and
    ``noise`` detached (for the fake score, x0 is the student's stopgrad(x0_hat)); the model saw
    x_t = add_noise(x0, noise, abar).

    Args:
        pred: The denoiser's output at x_t, (B, ...), with grad.
        x0: Clean samples, same shape.
        noise: Noise used to make x_t, same shape.
        abar: abar_t, a scalar or (B, 1, ..., 1).
        prediction_type: The denoiser's prediction type (``one_step.PREDICTION_TYPES``).

    Returns:
        The scalar float32 mean-squared error and diagnostics ``{"loss": ...}``.

    Raises:
        ValueError: For an unknown ``prediction_type`` or mismatched shapes.
    """
    _check_same_shape(pred=pred, x0=x0, noise=noise)
    target = prediction_target(x0.detach(), noise.detach(), abar.detach(), prediction_type)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    return loss, {"loss": float(loss.detach())}


fake_score_loss = denoising_loss
"""The fake score's loss in VSD: ``denoising_loss`` on stopgrad(x0_hat)."""
