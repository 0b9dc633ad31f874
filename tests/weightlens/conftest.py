"""Generated checkpoint fixtures: a tiny diffusers U-Net teacher and a planted student."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from weightlens.planted import Plant, build_tiny_unet, plant_student

sys.path.insert(0, str(Path(__file__).parent))

from planted_pair import RANK, ROTATED, SCALED  # noqa: E402


@dataclass(frozen=True)
class UnetPair:
    teacher: dict[str, torch.Tensor]
    student: dict[str, torch.Tensor]
    plant: Plant
    model: torch.nn.Module


@pytest.fixture(scope="session")
def unet_pair() -> UnetPair:
    """Teacher: a seeded tiny U-Net. Student: exact rank-3 rotations + pure norm scalings,
    and small noise on every other tensor (so every layer changed)."""
    model = build_tiny_unet(seed=0)
    teacher = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plant = Plant(rotate=dict.fromkeys(ROTATED, RANK), scale=SCALED)
    student = plant_student(teacher, plant, seed=1)
    gen = torch.Generator().manual_seed(2)
    for key, w in student.items():
        if key not in plant.rotate and key not in plant.scale:
            student[key] = w + 0.01 * w.std().nan_to_num(1.0) * torch.randn(w.shape, generator=gen) if w.numel() > 1 else w + 0.01
    return UnetPair(teacher, student, plant, model)
