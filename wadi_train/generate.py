"""One-step generation from an exported student (or a live run) and PNG grids.

Class-conditional exports (the digits demo) sample in the denoiser's own space. Text-conditioned
exports of a Stable Diffusion pipeline load with diffusers' own pipeline class; the prompt goes
through the pipeline's `encode_prompt`, the student makes x0 in one call at the top timestep
(`one_step_x0`, the export's noise schedule and prediction type) and the VAE decodes it. Any
height and width that the VAE (and a DiT's patch size) divide work, beyond the training size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from wadi_train.errors import ModelLoadError, OptionError
from wadi_train.models import FAMILIES, Cond, cast_model, denoise
from wadi_train.one_step import one_step_x0

__all__ = [
    "PROMPT_ENCODERS",
    "generate",
    "generate_from_prompts",
    "image_grid",
    "load_class_generator",
    "load_export_pipeline",
    "load_exported",
    "one_step_images",
    "read_export_info",
    "save_grid",
    "save_images",
    "write_student_samples",
]

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


def save_images(images: Tensor, path: Path) -> Path:
    """One image as itself, several as a grid at their own size (text-to-image output)."""
    from PIL import Image

    if images.shape[0] > 1:
        return save_grid(images, path, upscale=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, 1)[1:-1, 1:-1]).save(path)  # no gutters around a lone image
    return path


def _again(root: Path) -> str:
    return f"export again with `wadi-train export RUN -o {root} --overwrite`"


def read_export_info(folder: str | Path) -> dict[str, Any]:
    """The `wadi_export.json` of an export folder (family, prediction type, noise schedule...)."""
    root = Path(folder)
    info_path = root / "wadi_export.json"
    if not info_path.is_file():
        raise ModelLoadError(f"{root}: not a wadi-train export (no wadi_export.json); run `wadi-train export RUN -o {root}`")
    try:
        info = json.loads(info_path.read_text())
        if info["family"] not in FAMILIES:
            raise KeyError(f"family {info['family']!r} is not one of {sorted(FAMILIES)}")
        missing = [k for k in ("prediction_type", "alphas_cumprod") if k not in info]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{info_path}: not a readable export record ({type(exc).__name__}: {exc}); {_again(root)}") from None
    if missing:
        raise ModelLoadError(f"{info_path}: lacks {missing}; {_again(root)}")
    return info


def load_exported(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """An exported model folder (or pipeline folder): (denoiser, export info, family)."""
    root = Path(folder)
    info = read_export_info(root)
    family = FAMILIES[info["family"]]
    model_dir = root / family.subfolder if (root / "model_index.json").is_file() else root / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: the exported model is missing (no config.json); {_again(root)}")
    try:
        model = family.model_class().from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{model_dir}: could not load the exported {family.class_name} ({str(exc).strip().splitlines()[0][:200]}); {_again(root)}") from None
    return model.eval().requires_grad_(False), info, info["family"]


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name not in ("float32", "float16", "bfloat16"):
        raise OptionError(f"--dtype {name!r}: use float32, float16 or bfloat16")
    return getattr(torch, name)


def load_class_generator(folder: str | Path, device: str = "cpu", dtype: str | None = None) -> tuple[Callable[[Tensor, Cond], Tensor], Any, dict[str, Any]]:
    """An exported class-conditional student on `device`: (x0(noise, cond), its U-Net's config, export info).

    x0 is the one-step generator: one model call on `noise` (moved to the device) with `cond`.
    """
    model, info, family = load_exported(folder)
    cast_model(model.to(device), _dtype(dtype, next(model.parameters()).dtype))
    alphas = torch.tensor(info["alphas_cumprod"], dtype=torch.float32, device=device)
    dt = next(model.parameters()).dtype

    def x0(noise: Tensor, cond: Cond) -> Tensor:
        cond = cond.to(device)
        return one_step_x0(lambda x, t: denoise(model, family, x.to(dt), t, cond), noise.to(device), alphas, info["prediction_type"], info.get("generator_timestep"))

    return x0, model.config, {**info, "family": family, "dtype": str(dt).removeprefix("torch.")}


@torch.no_grad()
def generate(folder: str | Path, classes: list[int] | None = None, n: int = 16, seed: int = 0, height: int | None = None, width: int | None = None, device: str = "cpu", dtype: str | None = None) -> Tensor:
    """One-step samples from an exported class-conditional student: (n, C, H, W) in [-1, 1]."""
    if read_export_info(folder).get("conditioning") == "text":
        raise OptionError(f"{folder}: a text-conditioned export; give a prompt: `wadi-train generate {folder} --prompt 'a photo of a cat'`")
    x0, c, info = load_class_generator(folder, device, dtype)
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)] if classes else torch.arange(n) % info.get("num_classes", 10))
    noise = torch.randn(n, c.in_channels, height or size, width or size, generator=gen)
    return x0(noise, Cond(class_labels=labels))


def _encode_sd(pipe: Any, prompts: list[str], device: torch.device) -> Cond:
    # CLIP hidden states as the stock pipeline makes them (truncation at 77 tokens, clip_skip None)
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Cond(encoder_hidden_states=embeds)


# diffusers pipeline class -> prompts to the denoiser's conditioning. SDXL (pooled embeddings and
# size ids) and PixArt (T5 with a padding mask) need their own entries.
PROMPT_ENCODERS: dict[str, Callable[[Any, list[str], torch.device], Cond]] = {
    "StableDiffusionPipeline": _encode_sd,
}
_UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")  # generate never calls them


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` where diffusers has it (recent releases deprecate `torch_dtype=`), else `torch_dtype=`."""
    import diffusers.utils.deprecation_utils as dep

    return {"dtype": dtype} if hasattr(dep, "_resolve_dtype") else {"torch_dtype": dtype}


def load_export_pipeline(folder: str | Path, device: str = "cpu", dtype: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A text-conditioned export as its stock diffusers pipeline, on `device`: (pipeline, info).

    The safety checker and image encoder are not loaded (one-step generation does not call
    them). `dtype` defaults to float32 on CPU and the export's dtype elsewhere.
    """
    from diffusers import DiffusionPipeline

    root = Path(folder)
    info = read_export_info(root)
    if info.get("conditioning") != "text":
        raise OptionError(f"{root}: a class-conditional export; generate with --class, not --prompt")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(f"{root}: a bare model export (no model_index.json, so no text encoder or VAE); text-to-image needs a run whose model.pretrained is a diffusers pipeline folder, exported with `wadi-train export`")
    index = json.loads(index_path.read_text())
    cls = index.get("_class_name")
    if cls not in PROMPT_ENCODERS:
        raise ModelLoadError(f"{root}: a {cls} export; text-to-image generate supports {sorted(PROMPT_ENCODERS)} (SD1.x/2.x); load this one with diffusers' {cls}.from_pretrained")
    skip = {k: None for k in _UNUSED_PARTS if (index.get(k) or [None])[0] is not None}
    torch_dtype = _dtype(dtype, torch.float32 if torch.device(device).type == "cpu" else getattr(torch, info.get("dtype", "float32")))
    try:
        pipe = DiffusionPipeline.from_pretrained(root, local_files_only=True, **_dtype_kwarg(torch_dtype), **skip, **({"requires_safety_checker": False} if skip else {}))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{root}: could not load the exported {cls} ({str(exc).strip().splitlines()[0][:200]}); {_again(root)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), info


def _latent_hw(pipe: Any, denoiser: Any, height: int | None, width: int | None) -> tuple[int, int]:
    """Latent (h, w) for an image size; the default is the denoiser's training size."""
    vae_factor = int(pipe.vae_scale_factor)
    patch = int(getattr(denoiser.config, "patch_size", None) or 1)
    step = vae_factor * patch
    sample = denoiser.config.sample_size
    default = int(sample if isinstance(sample, int) else sample[0]) * vae_factor
    sizes: list[int] = []
    for flag, given in (("--height", height), ("--width", width)):
        value = default if given is None else given
        if value <= 0 or value % step:
            why = f"the VAE downsamples by {vae_factor}" + (f" and the transformer's patches are {patch} latents wide" if patch > 1 else "")
            nearest = max(step, round(value / step) * step)
            raise OptionError(f"{flag} {value}: must be a positive multiple of {step} ({why}); try {flag} {nearest}")
        sizes.append(value // vae_factor)
    return sizes[0], sizes[1]


@torch.no_grad()
def generate_from_prompts(folder: str | Path, prompts: list[str], n: int | None = None, seed: int = 0, height: int | None = None, width: int | None = None, device: str = "cpu", dtype: str | None = None, batch_size: int = 4) -> Tensor:
    """One-step text-to-image from an exported Stable Diffusion pipeline.

    Args:
        folder: a `wadi-train export` folder of a text-conditioned run (a pipeline folder).
        prompts: cycled over the `n` images (default: one image per prompt).
        seed: seeds the noise; the same seed gives the same images whatever `batch_size`.
        height, width: image size in pixels, multiples of the VAE's factor (8 for SD); default
            the training size. Larger sizes work (latents are height/8 x width/8).
        device, dtype: where and in what precision the pipeline runs.
        batch_size: images per forward pass (memory at high resolution).

    Returns:
        (n, 3, height, width) images in [-1, 1], float32 on CPU.
    """
    if not prompts:
        raise OptionError("--prompt: give at least one prompt")
    n = len(prompts) if n is None else n
    if n < 1 or batch_size < 1:
        raise OptionError(f"-n {n}, batch size {batch_size}: both must be at least 1")
    pipe, info = load_export_pipeline(folder, device, dtype)
    denoiser = getattr(pipe, FAMILIES[info["family"]].subfolder)
    dev = pipe.device
    h, w = _latent_hw(pipe, denoiser, height, width)
    log.info("%d image(s) of %dx%d px (latents %dx%d) from %s", n, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, h, w, folder)
    embeds = PROMPT_ENCODERS[type(pipe).__name__](pipe, list(prompts), dev)
    idx = torch.arange(n) % len(prompts)
    noise = torch.randn(n, denoiser.config.in_channels, h, w, generator=torch.Generator().manual_seed(seed))  # (n, C, h, w)
    images = []
    for start in range(0, n, batch_size):
        rows = idx[start : start + batch_size].to(dev)
        images.append(one_step_images(pipe, info, noise[start : start + batch_size], embeds.index(rows)).cpu())
    return torch.cat(images)


@torch.no_grad()
def one_step_images(pipe: Any, info: dict[str, Any], noise: Tensor, cond: Cond) -> Tensor:
    """The student's one-step x0 from latent noise (B, C, h, w), decoded by the pipeline's VAE.

    Args:
        pipe: a pipeline from `load_export_pipeline`.
        info: its export record (noise schedule, prediction type, generator timestep).
        noise: x_T, standard normal latents (any device; moved to the pipeline's).
        cond: the prompts' conditioning, e.g. `PROMPT_ENCODERS[...](pipe, prompts, device)`.

    Returns:
        (B, 3, 8h, 8w) images in [-1, 1] (for SD's 8x VAE), float32 on the pipeline's device.
    """
    family = info["family"]
    denoiser = getattr(pipe, FAMILIES[family].subfolder)
    dev, dt = pipe.device, denoiser.dtype
    alphas = torch.tensor(info["alphas_cumprod"], dtype=torch.float32, device=dev)
    x0 = one_step_x0(lambda x, t: denoise(denoiser, family, x.to(dt), t, cond), noise.to(dev), alphas, info["prediction_type"], info.get("generator_timestep"))
    vae = pipe.vae
    latents = x0 / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)  # undo the VAE's latent scaling
    return vae.decode(latents.to(vae.dtype)).sample.float().clamp(-1, 1)


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
