"""One-step samplers over an exported student for evaluation: prompts in, uint8 RGB images out.

`load_sampler(export_folder)` gives a callable `sampler(prompts, indices)` for either kind of
export: a text-conditioned Stable Diffusion pipeline (prompt -> the pipeline's text encoder ->
one student call at the top timestep -> VAE decode; loaded with `generate.load_export_pipeline`)
or a class-conditional model (each prompt is a class label such as "3"). Sample i's noise comes
from its own generator seeded with (seed, i), so an image depends on its index and the seed
only, never on the batch size or on which batch it lands in, and runs can be split or resumed.
No classifier-free guidance: a VSD student samples in one unguided call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wadi_train.evaluation.errors import EvaluationError
from wadi_train.models import FAMILIES, Cond

__all__ = ["OneStepSampler", "load_sampler", "sample_noise", "to_uint8"]

log = logging.getLogger(__name__)


def sample_noise(shape: tuple[int, ...], seed: int, index: int) -> Tensor:
    """Standard normal noise (1, *shape) for sample `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(state)))


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] (C = 1 or 3) -> (B, 3, H, W) uint8 on CPU, as a PNG would hold."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x[:, :3].contiguous()


@dataclass
class OneStepSampler:
    """Turns prompts and sample indices into images; see `load_sampler`.

    Attributes:
        conditioning: "text" or "class".
        resolution: side of the (square) images in pixels.
        describe: what was loaded, for the results record.
    """

    conditioning: str
    resolution: int
    describe: dict[str, Any]
    _condition: Callable[[list[str]], Cond]
    _x0: Callable[[Tensor, Cond], Tensor]
    _noise_shape: tuple[int, int, int]
    _seed: int

    def check(self, prompts: list[str]) -> None:
        """Raise EvaluationError now, before any long work, for prompts this model cannot take
        (a class-conditional export needs class labels)."""
        if self.conditioning == "class":
            self._condition(prompts)

    @torch.no_grad()
    def __call__(self, prompts: list[str], indices: list[int]) -> Tensor:
        """(B, 3, R, R) uint8 images, image j made from prompts[j] and the noise of indices[j]."""
        if len(prompts) != len(indices):
            raise EvaluationError(f"{len(prompts)} prompts for {len(indices)} sample indices")
        noise = torch.cat([sample_noise(self._noise_shape, self._seed, i) for i in indices])
        return to_uint8(self._x0(noise, self._condition(prompts)))


def _labels(prompts: list[str], num_classes: int) -> Tensor:
    """Class-conditional exports: each prompt must be a label 0..num_classes-1."""
    try:
        labels = [int(p) for p in prompts]
    except ValueError:
        bad = next(p for p in prompts if not p.strip().lstrip("-").isdigit())
        raise EvaluationError(f"prompt {bad!r}: this export is class-conditional, so each prompt must be a class label 0..{num_classes - 1} (one per line)") from None
    if min(labels) < 0 or max(labels) >= num_classes:
        raise EvaluationError(f"class label {min(labels) if min(labels) < 0 else max(labels)}: outside 0..{num_classes - 1} for this export")
    return torch.tensor(labels, dtype=torch.long)


def _class_sampler(folder: Path, device: str, dtype: str | None, resolution: int | None, seed: int) -> OneStepSampler:
    from wadi_train.generate import load_class_generator

    x0, c, info = load_class_generator(folder, device, dtype)
    size = resolution or (c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0])
    num_classes = int(info.get("num_classes", 10))
    return OneStepSampler(
        conditioning="class", resolution=size, describe={"family": info["family"], "conditioning": "class", "num_classes": num_classes, "dtype": info["dtype"]},
        _condition=lambda prompts: Cond(class_labels=_labels(prompts, num_classes)), _x0=x0,
        _noise_shape=(c.in_channels, size, size), _seed=seed,
    )


def _text_sampler(folder: Path, device: str, dtype: str | None, resolution: int | None, seed: int) -> OneStepSampler:
    from wadi_train.generate import PROMPT_ENCODERS, load_export_pipeline, one_step_images

    pipe, info = load_export_pipeline(folder, device, dtype)
    family = info["family"]
    denoiser = getattr(pipe, FAMILIES[family].subfolder)
    factor = int(pipe.vae_scale_factor) * int(getattr(denoiser.config, "patch_size", None) or 1)
    sample = denoiser.config.sample_size
    size = resolution or (sample if isinstance(sample, int) else sample[0]) * int(pipe.vae_scale_factor)
    if size % factor:
        raise EvaluationError(f"--resolution {size}: must be a multiple of {factor} for this model (the VAE's downsampling); try {max(factor, round(size / factor) * factor)}")
    latent = size // int(pipe.vae_scale_factor)
    encode = PROMPT_ENCODERS[type(pipe).__name__]
    dt = denoiser.dtype

    def x0(noise: Tensor, cond: Cond) -> Tensor:
        return one_step_images(pipe, info, noise, cond)

    return OneStepSampler(
        conditioning="text", resolution=size, describe={"family": family, "conditioning": "text", "pipeline": type(pipe).__name__, "dtype": str(dt).removeprefix("torch.")},
        _condition=lambda prompts: encode(pipe, list(prompts), pipe.device), _x0=x0,
        _noise_shape=(denoiser.config.in_channels, latent, latent), _seed=seed,
    )


def load_sampler(folder: str | Path, device: str = "cpu", dtype: str | None = None, resolution: int | None = None, seed: int = 0) -> OneStepSampler:
    """A one-step sampler over a `wadi-train export` folder.

    Args:
        folder: the export; text-conditioned exports must be Stable Diffusion pipeline folders.
        device: where the models run.
        dtype: float32, float16 or bfloat16; default float32 on CPU, else the export's dtype.
        resolution: image side in pixels; default the training size.
        seed: the run's seed (with each sample's index, it seeds that sample's noise).

    Raises:
        ModelLoadError / OptionError / EvaluationError: the folder is not a usable export.
    """
    from wadi_train.generate import read_export_info

    root = Path(folder)
    info = read_export_info(root)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = "float32"
    build = _text_sampler if info.get("conditioning") == "text" else _class_sampler
    sampler = build(root, device, dtype, resolution, seed)
    log.info("one-step %s sampler over %s at %d px", sampler.conditioning, root, sampler.resolution)
    return sampler
