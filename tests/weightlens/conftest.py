"""Generated checkpoint fixtures: a tiny diffusers U-Net teacher and a planted student."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from weightlens.planted import Plant, build_tiny_unet, plant_student

sys.path.insert(0, str(Path(__file__).parent))

RANK = 3
ROTATED = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
)
SCALED = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight": 1.07,
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight": 0.95,
    "down_blocks.1.resnets.0.conv1.weight": 1.03,
}


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
