"""The digits teacher: a small class-conditional diffusers U-Net trained as an ordinary DDPM.

Epsilon prediction, 1000 steps, 10 % of labels replaced by the null class (for CFG), AdamW
with a cosine schedule and an EMA of the weights (the EMA is what is saved). Cached as
`teacher-{size}px.safetensors` + `teacher-{size}px.json` (config, steps, seconds, loss).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from wadi_train.ema import EMA
from wadi_train.losses import denoising_loss
from wadi_train.models import Cond, denoise
from wadi_train.one_step import abar_at, add_noise, sample_timesteps

__all__ = ["digits_unet_config", "TeacherSettings", "train_teacher", "load_or_train_teacher"]

log = logging.getLogger(__name__)
NUM_CLASSES = 10
# Stable Diffusion's schedule: abar at t = 999 is 0.0047, so a one-step epsilon prediction is
# amplified 1/sqrt(abar) = 15x into x0 (the linear DDPM schedule's 4e-5 amplifies 160x, which
# made one-step VSD students blow up to saturated noise in our runs).
SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ASSETS = Path(__file__).parent / "assets"


def digits_unet_config(size: int = 8, width: int = 32) -> dict[str, Any]:
    """A class-conditional UNet2DConditionModel with self-attention in both levels (~1M params)."""
    return {
        "sample_size": size, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [width, 2 * width], "layers_per_block": 2,
        "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2D", "num_class_embeds": NUM_CLASSES + 1,
        "norm_num_groups": 8, "attention_head_dim": 8,
    }


@dataclass(frozen=True)
class TeacherSettings:
    size: int = 8
    width: int = 32
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.998
    null_fraction: float = 0.1
    seed: int = 0


def train_teacher(x_train: torch.Tensor, y_train: torch.Tensor, s: TeacherSettings, progress: Callable[[int, int, float], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the DDPM teacher; returns (EMA state dict, info)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(s.seed)
    config = digits_unet_config(s.size, s.width)
    model = UNet2DConditionModel.from_config(config).train()
    alphas = DDPMScheduler(num_train_timesteps=1000, **SCHEDULE).alphas_cumprod.float()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    warm = max(s.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i / s.steps, 1.0))))
    params = dict(model.named_parameters())
    ema = EMA(params, decay=s.ema_decay)
    gen = torch.Generator().manual_seed(s.seed)
    start, loss_avg = time.perf_counter(), math.nan
    for step in range(s.steps):
        idx = torch.randint(len(x_train), (s.batch_size,), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(s.batch_size, generator=gen) < s.null_fraction] = NUM_CLASSES
        t = sample_timesteps(s.batch_size, 0, 999, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = abar_at(alphas, t, 4)
        pred = denoise(model, "unet2d_condition", add_noise(x0, noise, ab), t, Cond(class_labels=y))
        loss, _ = denoising_loss(pred, x0, noise, ab, "epsilon")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(params)
        loss_avg = float(loss.detach()) if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * float(loss.detach())
        if progress is not None:
            progress(step + 1, s.steps, loss_avg)
    ema.copy_to(params)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    info = {"config": config, "scheduler": SCHEDULE, "settings": s.__dict__, "seconds": round(time.perf_counter() - start, 1), "final_loss": loss_avg, "params": sum(p.numel() for p in model.parameters())}
    return state, info


def load_or_train_teacher(cache_dir: Path, x_train: torch.Tensor, y_train: torch.Tensor, s: TeacherSettings, retrain: bool = False, progress: Callable[[int, int, float], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached teacher's weights path and info, training it first when needed."""
    tag = f"teacher-{s.size}px-w{s.width}-s{s.steps}-sl"
    weights, meta = cache_dir / f"{tag}.safetensors", cache_dir / f"{tag}.json"
    shipped = ASSETS / f"{tag}.safetensors"
    if not retrain and not weights.is_file() and shipped.is_file() and s.seed == 0:
        weights, meta = shipped, shipped.with_suffix(".json")  # the committed teacher (see README)
    if weights.is_file() and meta.is_file() and not retrain:
        try:
            info = json.loads(meta.read_text())
            load_file(weights)  # validates the file
            return weights, info
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            log.warning("cached teacher %s is unreadable (%s); retraining", weights, exc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state, info = train_teacher(x_train, y_train, s, progress)
    save_file(state, weights)
    meta.write_text(json.dumps(info, indent=2))
    return weights, info
