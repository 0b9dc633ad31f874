"""`weightlens demo`: a tiny teacher, a planted student, a full comparison.

Builds a small diffusers U-Net from config (seeded, nothing downloads), plants an exact rank-4
LoRaD rotation in every attention/FF Linear and a 0.1 % norm scaling in every resnet conv, adds
a little noise elsewhere so every layer changed, and runs `compare` on the pair.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightlens.compare import CompareOptions, ProgressCallback, compare
from weightlens.output import write_analysis
from weightlens.planted import Plant, build_tiny_unet, default_plant, plant_student
from weightlens.results import Analysis

__all__ = ["make_demo_pair", "run_demo"]


def make_demo_pair(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write teacher.safetensors and student.safetensors into `folder`."""
    teacher = {k: v.detach().clone() for k, v in build_tiny_unet(seed).state_dict().items()}
    plant = default_plant(teacher, {k: tuple(v.shape) for k, v in teacher.items()})
    plant = Plant(rotate=plant.rotate, scale=dict.fromkeys(plant.scale, 1.001))  # like the paper: ~0.1 % norm change
    student = plant_student(teacher, plant, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for key, w in student.items():
        if key not in plant.rotate and key not in plant.scale:
            student[key] = w + 1e-3 * w.abs().mean() * torch.randn(w.shape, generator=gen)
    paths = folder / "teacher.safetensors", folder / "student.safetensors"
    save_file(teacher, paths[0])
    save_file(student, paths[1])
    return paths


def run_demo(output: Path, progress: ProgressCallback | None = None) -> tuple[Analysis, Path]:
    """Make the pair in a temp folder, compare it, write the analysis into `output`."""
    with tempfile.TemporaryDirectory(prefix="weightlens-demo-") as tmp:
        teacher, student = make_demo_pair(Path(tmp))
        analysis = compare(teacher, student, CompareOptions(budget="2%"), progress=progress)
    write_analysis(analysis, output, overwrite=True)
    return analysis, output
