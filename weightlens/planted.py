"""Planted students: a teacher changed in known ways, for the demo, tests and benchmarks.

A *planted* student applies an exact rank-r LoRaD rotation to chosen Linear layers (equal
singular values, so its Theta has rank exactly r at any energy target below 1) and a pure
per-row norm scaling to others; everything else is copied. weightlens must read the plant
back: zero norm change and rotation_explained 1 on rotated layers, Theta rank r, zero
direction change and the planted scale on scaled layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from weightlens.rotation import rotate_pairs

__all__ = ["Plant", "planted_theta", "plant_student", "tiny_unet_config", "build_tiny_unet"]


@dataclass(frozen=True)
class Plant:
    """What to do to which layers.

    Attributes:
        rotate: weight key -> rank of the exact LoRaD rotation to apply.
        scale: weight key -> per-row norm factor (every row multiplied by it).
        angle_rms: RMS of the planted angles in radians.
    """

    rotate: Mapping[str, int]
    scale: Mapping[str, float]
    angle_rms: float = 0.02


def planted_theta(out: int, pairs: int, rank: int, angle_rms: float, generator: torch.Generator) -> Tensor:
    """A rank-`rank` angle matrix with equal singular values and the given RMS angle."""
    q_out, _ = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(pairs, rank, generator=generator, dtype=torch.float64))
    sigma = angle_rms * math.sqrt(out * pairs / rank)  # ||Theta||_F = angle_rms * sqrt(out*pairs)
    return (sigma * q_out @ q_in.T).float()  # (out, pairs)


def plant_student(teacher: Mapping[str, Tensor], plant: Plant, seed: int = 0) -> dict[str, Tensor]:
    """Return a student state dict: the teacher with the plant applied (dtypes kept)."""
    gen = torch.Generator().manual_seed(seed)
    student: dict[str, Tensor] = {}
    for key in sorted(teacher):
        w = teacher[key]
        if key in plant.rotate:
            mat = w.reshape(w.shape[0], -1).float()
            theta = planted_theta(mat.shape[0], mat.shape[1] // 2, plant.rotate[key], plant.angle_rms, gen)
            student[key] = rotate_pairs(mat, theta).reshape(w.shape).to(w.dtype)
        elif key in plant.scale:
            student[key] = (w.float() * plant.scale[key]).to(w.dtype)
        else:
            student[key] = w.clone()
    return student


def tiny_unet_config() -> dict[str, object]:
    """A small class-conditional-capable diffusers UNet2DConditionModel config (~0.6M params)."""
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def build_tiny_unet(seed: int = 0, config: Mapping[str, object] | None = None) -> torch.nn.Module:
    """Build the tiny U-Net from config with seeded random weights (nothing downloads)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config or tiny_unet_config()))


def default_plant(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], rank: int = 4) -> Plant:
    """Rotate every attention/FF Linear at `rank`; scale every resnet conv by 1.05."""
    rotate = {k: rank for k in keys if k.endswith(".weight") and len(shapes[k]) == 2 and ("attn" in k or ".ff." in k or "proj_" in k) and shapes[k][1] % 2 == 0 and min(shapes[k][0], shapes[k][1] // 2) > rank}
    scale = {k: 1.05 for k in keys if k.endswith(".weight") and len(shapes[k]) == 4 and ".resnets." in k}
    return Plant(rotate=rotate, scale=scale)
