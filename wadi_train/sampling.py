"""Multi-step sampling of a teacher (DDIM) with classifier-free guidance, for evaluation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wadi_train.models import Cond, denoise
from wadi_train.one_step import cfg as guide

__all__ = ["ddim_sample"]


@torch.no_grad()
def ddim_sample(model: nn.Module, family: str, noise: Tensor, cond: Cond, uncond: Cond, scheduler_config: dict, steps: int, guidance: float = 1.0) -> Tensor:
    """DDIM (eta 0) from pure noise in `steps` steps with CFG; returns x0 (B, C, H, W).

    Uses diffusers' DDIMScheduler built from the teacher's scheduler config, with
    `timestep_spacing="trailing"` so that even 1 step starts at t = T-1 (pure noise).
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
            pred = denoise(model, family, x, tt, cond)
        else:
            out = denoise(model, family, torch.cat((x, x)), torch.cat((tt, tt)), both)
            pred = guide(out[x.shape[0]:], out[: x.shape[0]], guidance)
        x = sched.step(pred, t, x).prev_sample
    return x
