"""Noise-schedule maths for DDPM-style diffusion and the one-step generator of DESIGN §5.

Everything here is a pure function of tensors. The schedule enters only as ``alphas_cumprod``
(abar, shape (T,)), which callers take from the diffusers scheduler the model was trained with,
e.g. ``DDPMScheduler.from_config(...).alphas_cumprod`` or ``DDIMScheduler(...).alphas_cumprod``;
no alpha is ever hard-coded. The forward process is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(Ho et al. 2020, eq. 4) and a denoiser predicts eps ("epsilon"), v = sqrt(abar) eps -
sqrt(1 - abar) x0 ("v_prediction", Salimans & Ho 2022, §4) or x0 itself ("sample"), the three
``prediction_type`` values of diffusers. Maths runs in float32 (float64 if an input is float64)
and results come back in that dtype; the caller casts for the network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "abar_at",
    "add_noise",
    "cfg",
    "check_prediction_type",
    "eps_from_prediction",
    "one_step_x0",
    "prediction_target",
    "sample_timesteps",
    "x0_from_prediction",
]

logger = logging.getLogger(__name__)

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the valid types if ``prediction_type`` is not one of them.

    Args:
        prediction_type: A diffusers scheduler's ``config.prediction_type``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of "
            f"{', '.join(repr(p) for p in PREDICTION_TYPES)} (the scheduler config's "
            "prediction_type for the model being distilled)"
        )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision of the schedule maths."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_abar(abar: Tensor, x: Tensor, name: str = "x") -> None:
    """Reject an abar that would broadcast along the wrong axis (e.g. (B,) against (B, C, H, W))."""
    if abar.ndim not in (0, x.ndim):
        raise ValueError(
            f"abar has shape {tuple(abar.shape)} but {name} has {x.ndim} dims {tuple(x.shape)}; "
            f"abar must be a scalar or have {x.ndim} dims, e.g. abar_at(alphas_cumprod, t, "
            f"ndim={x.ndim}) -> (B{', 1' * (x.ndim - 1)})"
        )


def abar_at(alphas_cumprod: Tensor, t: Tensor, ndim: int = 4) -> Tensor:
    """Gather abar_t for integer timesteps, shaped to broadcast against a batch of samples.

    Args:
        alphas_cumprod: The scheduler's cumulative product of alphas, shape (T,), e.g.
            ``DDPMScheduler(...).alphas_cumprod``.
        t: Integer timesteps in [0, T - 1], shape (B,) (a 0-d tensor counts as B = 1).
        ndim: Number of dims of the samples abar will multiply; the result has this many.

    Returns:
        float32 abar of shape (B, 1, ..., 1) with ``ndim`` dims, on ``t``'s device.

    Raises:
        ValueError: If ``t`` is not an integer tensor, is out of range, or ``ndim`` < 1.
    """
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
    if ndim < 1:
        raise ValueError(f"ndim must be >= 1, got {ndim}")
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must have shape (T,), got {tuple(alphas_cumprod.shape)}")
    num_steps = alphas_cumprod.shape[0]
    t = t.reshape(-1)  # (B,)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(
            f"timesteps must lie in [0, {num_steps - 1}] for a {num_steps}-step schedule, "
            f"got range [{int(t.min())}, {int(t.max())}]"
        )
    abar = alphas_cumprod.to(device=t.device)[t].to(torch.float32)  # (B,)
    return abar.reshape(-1, *([1] * (ndim - 1)))  # (B, 1, ..., 1)


def add_noise(x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """Forward diffusion: x_t = sqrt(abar) x0 + sqrt(1 - abar) noise.

    Matches ``DDPMScheduler.add_noise(x0, noise, t)`` with ``abar = abar_at(alphas_cumprod, t)``.

    Args:
        x0: Clean samples, (B, ...).
        noise: Standard normal noise, same shape as ``x0``.
        abar: abar_t, a scalar or (B, 1, ..., 1) with ``x0.ndim`` dims.

    Returns:
        x_t, same shape as ``x0``, in float32 (float64 if an input is float64).
    """
    _check_abar(abar, x0, "x0")
    dtype = _compute_dtype(x0, noise, abar)
    a = abar.to(dtype)
    return a.sqrt() * x0.to(dtype) + (1 - a).sqrt() * noise.to(dtype)


def x0_from_prediction(pred: Tensor, x_t: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """Recover the model's estimate of x0 from its output at x_t.

    - "epsilon": x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    - "v_prediction": x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    - "sample": x0 = pred

    For "epsilon" at large t the division by sqrt(abar) amplifies errors in eps (by ~15x at
    t = 999 of SD's schedule); nothing is clamped, as in diffusers' schedulers.

    Args:
        pred: Model output, same shape as ``x_t``.
        x_t: Noisy input the model saw, (B, ...).
        abar: abar_t, a scalar or (B, 1, ..., 1) with ``x_t.ndim`` dims.
        prediction_type: One of ``PREDICTION_TYPES``.

    Returns:
        Estimated x0, same shape as ``x_t``, in float32 (float64 if an input is float64).

    Raises:
        ValueError: For an unknown ``prediction_type`` or a mis-shaped ``abar``.
    """
    check_prediction_type(prediction_type)
    _check_abar(abar, x_t, "x_t")
    dtype = _compute_dtype(pred, x_t, abar)
    a, p, x = abar.to(dtype), pred.to(dtype), x_t.to(dtype)
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * p) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * p
    return p


def eps_from_prediction(pred: Tensor, x_t: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """Recover the model's estimate of the noise eps from its output at x_t.

    - "epsilon": eps = pred
    - "v_prediction": eps = sqrt(abar) v + sqrt(1 - abar) x_t
    - "sample": eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)

    Args:
        pred: Model output, same shape as ``x_t``.
        x_t: Noisy input the model saw, (B, ...).
        abar: abar_t, a scalar or (B, 1, ..., 1) with ``x_t.ndim`` dims.
        prediction_type: One of ``PREDICTION_TYPES``.

    Returns:
        Estimated eps, same shape as ``x_t``, in float32 (float64 if an input is float64).

    Raises:
        ValueError: For an unknown ``prediction_type`` or a mis-shaped ``abar``.
    """
    check_prediction_type(prediction_type)
    _check_abar(abar, x_t, "x_t")
    dtype = _compute_dtype(pred, x_t, abar)
    a, p, x = abar.to(dtype), pred.to(dtype), x_t.to(dtype)
    if prediction_type == "epsilon":
        return p
    if prediction_type == "v_prediction":
        return a.sqrt() * p + (1 - a).sqrt() * x
    return (x - a.sqrt() * p) / (1 - a).sqrt()


def prediction_target(x0: Tensor, noise: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """The regression target of a denoiser of the given type at x_t = add_noise(x0, noise, abar).

    - "epsilon": noise
    - "v_prediction": sqrt(abar) noise - sqrt(1 - abar) x0 (= ``DDPMScheduler.get_velocity``)
    - "sample": x0

    Args:
        x0: Clean samples, (B, ...).
        noise: The noise used to make x_t, same shape as ``x0``.
        abar: abar_t, a scalar or (B, 1, ..., 1) with ``x0.ndim`` dims.
        prediction_type: One of ``PREDICTION_TYPES``.

    Returns:
        The target, same shape as ``x0``, in float32 (float64 if an input is float64).

    Raises:
        ValueError: For an unknown ``prediction_type`` or a mis-shaped ``abar``.
    """
    check_prediction_type(prediction_type)
    _check_abar(abar, x0, "x0")
    dtype = _compute_dtype(x0, noise, abar)
    a, x, n = abar.to(dtype), x0.to(dtype), noise.to(dtype)
    if prediction_type == "epsilon":
        return n
    if prediction_type == "v_prediction":
        return a.sqrt() * n - (1 - a).sqrt() * x
    return x


def one_step_x0(
    predict: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    timestep: int | None = None,
) -> Tensor:
    """The one-step generator: x0_hat from a single model call on pure noise (DESIGN §5).

    The noise is taken as x_T at t = ``timestep`` (default T - 1, i.e. 999), the model's output
    there is converted to x0 with that timestep's abar. abar_999 is not zero (about 0.0047 for
    SD's scaled-linear schedule, 4e-5 for the linear DDPM one), so the scheduler's value is used,
    never an assumed 0. Gradients flow through ``predict`` (the student).

    Args:
        predict: ``predict(x_t, t)`` -> model output, with x_t (B, ...) and t a long tensor (B,);
            wrap the U-Net and its conditioning in a closure.
        noise: Standard normal noise used as x_T, (B, ...).
        alphas_cumprod: The scheduler's abar table, shape (T,), e.g.
            ``DDPMScheduler(...).alphas_cumprod`` (DDIM's is the same table).
        prediction_type: The model's prediction type, one of ``PREDICTION_TYPES``.
        timestep: The timestep the noise is placed at; default ``len(alphas_cumprod) - 1``.

    Returns:
        x0_hat, same shape as ``noise``, in float32 (float64 if an input is float64).

    Raises:
        ValueError: For an unknown ``prediction_type`` or an out-of-range ``timestep``.
    """
    check_prediction_type(prediction_type)
    if timestep is None:
        timestep = alphas_cumprod.shape[0] - 1
    t = torch.full((noise.shape[0],), timestep, dtype=torch.long, device=noise.device)  # (B,)
    abar = abar_at(alphas_cumprod, t, ndim=noise.ndim)  # (B, 1, ..., 1)
    pred = predict(noise, t)
    if pred.shape != noise.shape:
        raise ValueError(
            f"predict returned shape {tuple(pred.shape)} for input {tuple(noise.shape)}; a "
            "denoiser's output must match its input (take `.sample` of a diffusers U-Net output)"
        )
    return x0_from_prediction(pred, noise, abar, prediction_type)


def sample_timesteps(
    batch: int,
    low: int,
    high: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw timesteps uniformly from the integers in [low, high], both ends included.

    Args:
        batch: Number of timesteps B.
        low: Smallest timestep (e.g. 20 for the VSD student loss).
        high: Largest timestep, inclusive (e.g. 980).
        generator: Optional generator for reproducibility; sampling happens on its device and
            the result is moved to ``device``.
        device: Device of the result; default the generator's device, else CPU.

    Returns:
        Long tensor of shape (B,).

    Raises:
        ValueError: If ``low > high``, ``low < 0`` or ``batch < 0``.
    """
    if low < 0 or low > high:
        raise ValueError(f"need 0 <= low <= high for timesteps, got low={low}, high={high}")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    sample_device = generator.device if generator is not None else device
    t = torch.randint(
        low, high + 1, (batch,), generator=generator, device=sample_device, dtype=torch.long
    )
    return t if device is None else t.to(device)


def cfg(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: uncond + scale (cond - uncond) (Ho & Salimans 2022, eq. 6).

    Args:
        uncond: Model output without conditioning (empty prompt / null class).
        cond: Model output with conditioning, same shape.
        scale: Guidance scale; 1 returns ``cond``, 0 returns ``uncond``.

    Returns:
        The guided output, same shape and dtype (by type promotion) as the inputs.
    """
    return uncond + scale * (cond - uncond)
