"""Multi-step sampling of a teacher (DDIM) with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from wadi_train.models import Cond, denoise
from wadi_train.one_step import cfg as guide

__all__ = ["ddim_sample", "ddim_sample_fn"]

Predict = Callable[[Tensor, Tensor, Cond], Tensor]  # (x_t, t (B,), cond) -> model output


@torch.no_grad()
def ddim_sample_fn(predict: Predict, noise: Tensor, cond: Cond, uncond: Cond, scheduler_config: dict, steps: int, guidance: float = 1.0) -> Tensor:
    """DDIM (eta 0) from pure noise in `steps` steps with CFG; returns x0 (B, C, H, W).

    `predict` is the denoiser (any prediction type the scheduler config names). Uses diffusers'
    DDIMScheduler built from the teacher's scheduler config, with `timestep_spacing="trailing"`
    so that even 1 step starts at t = T-1 (pure noise), where the one-step student starts too.
    """
    from diffusers import DDIMScheduler

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    sched = DDIMScheduler.from_config({**keep, "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False})
    sched.set_timesteps(steps)
    x = noise
    both = cond.cat(uncond)
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        if guidance == 1.0:
            pred = predict(x, tt, cond)
        else:
            out = predict(torch.cat((x, x)), torch.cat((tt, tt)), both)
            pred = guide(out[x.shape[0]:], out[: x.shape[0]], guidance)
        x = sched.step(pred, t, x).prev_sample
    return x


def ddim_sample(model: nn.Module, family: str, noise: Tensor, cond: Cond, uncond: Cond, scheduler_config: dict, steps: int, guidance: float = 1.0) -> Tensor:
    """`ddim_sample_fn` with a plain diffusers denoiser of `family` (see `models.FAMILIES`)."""
    return ddim_sample_fn(lambda x, t, c: denoise(model, family, x, t, c), noise, cond, uncond, scheduler_config, steps, guidance)
