"""One-step generation from an exported student (or a live run) and PNG grids."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from wadi_train.errors import ModelLoadError
from wadi_train.models import FAMILIES, Cond, denoise
from wadi_train.one_step import one_step_x0

__all__ = ["image_grid", "save_grid", "load_exported", "generate", "write_student_samples"]

log = logging.getLogger(__name__)


def image_grid(images: Tensor, nrow: int | None = None, upscale: int = 1) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (H', W', 3) uint8 grid with 1-px gutters."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    n, _, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i].permute(1, 2, 0).numpy()
    if upscale > 1:
        grid = grid.repeat(upscale, 0).repeat(upscale, 1)
    return grid


def save_grid(images: Tensor, path: Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    scale = upscale or max(1, 128 // images.shape[-1])
    Image.fromarray(image_grid(images, nrow, scale)).save(path)
    return path


def load_exported(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """An exported model folder (or pipeline folder): (denoiser, export info, family)."""
    root = Path(folder)
    info_path = root / "wadi_export.json"
    if not info_path.is_file():
        raise ModelLoadError(f"{root}: not a wadi-train export (no wadi_export.json); run `wadi-train export RUN -o {root}`")
    again = f"export again with `wadi-train export RUN -o {root} --overwrite`"
    try:
        info = json.loads(info_path.read_text())
        family = FAMILIES[info["family"]]
        missing = [k for k in ("prediction_type", "alphas_cumprod") if k not in info]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{info_path}: not a readable export record ({type(exc).__name__}: {exc}); {again}") from None
    if missing:
        raise ModelLoadError(f"{info_path}: lacks {missing}; {again}")
    model_dir = root / family.subfolder if (root / "model_index.json").is_file() else root / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: the exported model is missing (no config.json); {again}")
    try:
        model = family.model_class().from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{model_dir}: could not load the exported {family.class_name} ({str(exc).strip().splitlines()[0][:200]}); {again}") from None
    return model.eval().requires_grad_(False), info, info["family"]


@torch.no_grad()
def generate(folder: str | Path, classes: list[int] | None = None, n: int = 16, seed: int = 0, height: int | None = None, width: int | None = None, device: str = "cpu") -> Tensor:
    """One-step samples from an exported class-conditional student: (n, C, H, W) in [-1, 1]."""
    model, info, family = load_exported(folder)
    model.to(device)
    alphas = torch.tensor(info["alphas_cumprod"], dtype=torch.float32, device=device)
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)] if classes else torch.arange(n) % info.get("num_classes", 10))
    noise = torch.randn(n, c.in_channels, height or size, width or size, generator=gen).to(device)
    cond = Cond(class_labels=labels.to(device))
    return one_step_x0(lambda x, t: denoise(model, family, x, t, cond), noise, alphas, info["prediction_type"], info.get("generator_timestep"))


@torch.no_grad()
def write_student_samples(distiller: Any, path: Path, n: int | None = None) -> Path:
    """A grid of the live student's one-step samples (fixed noise and classes)."""
    d = distiller
    n = n or d.config.train.num_samples
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn((n, *d.teacher.sample_shape), generator=gen).to(d.acc.device)
    if d.teacher.conditioning == "class":
        cond = Cond(class_labels=(torch.arange(n) % d.teacher.num_classes).to(d.acc.device))
    else:
        cond = d.sampler.sample(n, gen).to(d.acc.device)
    x0 = d.generate(noise, cond)
    if d.teacher.sample_shape[0] not in (1, 3):
        log.info("samples are latents; decoding needs the VAE: skipped %s", path)
        return path
    return save_grid(x0, path, nrow=int(math.sqrt(n)) if int(math.sqrt(n)) ** 2 == n else None)
