"""Teachers: a diffusers denoiser (U-Net or DiT) plus its noise schedule and conditioning.

`load_teacher(ModelConfig)` builds the denoiser from config (tests, digits) or loads it from a
local diffusers pipeline/model folder (Stable Diffusion, PixArt), nothing downloads. Model
families are a registry: each knows its diffusers class, its pipeline sub-folder and how to
call it. `Cond` carries conditioning (class labels or text embeddings) through CFG batching.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from wadi_train.config import ModelConfig
from wadi_train.errors import ModelLoadError

__all__ = ["Family", "FAMILIES", "Cond", "Teacher", "load_teacher", "teacher_problems", "denoise", "save_model_folder", "cast_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cond:
    """Conditioning for a batch: class labels and/or text embeddings (+ extra kwargs)."""

    class_labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Cond":
        return Cond(
            None if self.class_labels is None else fn(self.class_labels),
            None if self.encoder_hidden_states is None else fn(self.encoder_hidden_states),
            {k: fn(v) for k, v in self.extra.items()},
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Cond":
        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return self._map(move)

    def index(self, index: Tensor) -> "Cond":
        """The rows `index` of every tensor."""
        return self._map(lambda t: t[index])

    def cat(self, other: "Cond") -> "Cond":
        """Concatenate two batches (e.g. cond and uncond for one CFG forward)."""
        def pair(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None or b is None else torch.cat((a, b))
        return Cond(pair(self.class_labels, other.class_labels), pair(self.encoder_hidden_states, other.encoder_hidden_states), {k: torch.cat((v, other.extra[k])) for k, v in self.extra.items()})

    def where(self, mask: Tensor, other: "Cond") -> "Cond":
        """Per-sample choice: `other` where mask (B,) is True (unconditional dropout)."""
        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return a
            m = mask.view(-1, *([1] * (a.ndim - 1)))
            return torch.where(m, b, a)
        return Cond(pick(self.class_labels, other.class_labels), pick(self.encoder_hidden_states, other.encoder_hidden_states), {k: pick(v, other.extra[k]) for k, v in self.extra.items()})  # type: ignore[misc]


@dataclass(frozen=True)
class Family:
    """How to build, find and call one kind of diffusers denoiser."""

    class_name: str
    subfolder: str
    call: Callable[[nn.Module, Tensor, Tensor, Cond], Tensor]

    def model_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.class_name)


def _call_unet(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    added = dict(cond.extra)  # SDXL: text_embeds, time_ids; a padding mask is not an added condition
    mask = added.pop("encoder_attention_mask", None)
    return model(x, t, encoder_hidden_states=cond.encoder_hidden_states, class_labels=cond.class_labels, added_cond_kwargs=added or None, encoder_attention_mask=mask).sample


def _call_dit(model: nn.Module, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
    # PixArt's forward takes no class_labels; it masks padded T5 tokens as its pipeline does, and
    # its added conditions (resolution, aspect ratio) are only used at 1024 px.
    added = dict(cond.extra)
    mask = added.pop("encoder_attention_mask", None)
    added = added or {"resolution": None, "aspect_ratio": None}
    return model(x, encoder_hidden_states=cond.encoder_hidden_states, timestep=t, added_cond_kwargs=added, encoder_attention_mask=mask).sample


FAMILIES: dict[str, Family] = {
    "unet2d_condition": Family("UNet2DConditionModel", "unet", _call_unet),
    "pixart_transformer": Family("PixArtTransformer2DModel", "transformer", _call_dit),
}


@dataclass
class Teacher:
    """A frozen denoiser with everything needed to noise, denoise and condition."""

    backbone: nn.Module
    family: str
    alphas_cumprod: Tensor  # (T,) float32 on CPU
    prediction_type: str
    conditioning: str
    num_classes: int
    sample_shape: tuple[int, int, int]  # (C, H, W) the denoiser works in (latents or pixels)
    scheduler_config: dict[str, Any]
    pipeline_dir: Path | None = None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return denoise(self.backbone, self.family, x_t, t, cond)


def denoise(backbone: nn.Module, family: str, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """The denoiser's prediction for x_t at timesteps t (B,), learned-variance channels dropped."""
    out = FAMILIES[family].call(backbone, x_t, t, cond)
    return out[:, : x_t.shape[1]] if out.shape[1] > x_t.shape[1] else out


def _scheduler_root(root: Path) -> Path | None:
    """The folder whose `scheduler/` sub-folder holds the teacher's noise schedule, if any."""
    if (root / "model_index.json").is_file():
        return root
    return root.parent if (root.parent / "scheduler").is_dir() else None


def _scheduler_option_problems(cfg: ModelConfig) -> list[str]:
    """`model.scheduler` (DDPMScheduler keyword arguments, used when no folder has a scheduler)."""
    import inspect

    from diffusers import DDPMScheduler

    options = dict(cfg.scheduler or {})
    valid = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    problems = [f"model.scheduler.{k}: not a DDPMScheduler option; valid: {', '.join(sorted(valid))}" for k in sorted(set(options) - valid)]
    if options.get("prediction_type", cfg.prediction_type) != cfg.prediction_type:
        problems.append(f"model.scheduler.prediction_type = {options['prediction_type']!r} but model.prediction_type = {cfg.prediction_type!r}; make them agree")
    return problems


def teacher_problems(cfg: ModelConfig) -> list[str]:
    """What the teacher's noise schedule says about the config, read without loading anything:
    a `model.pretrained` folder's scheduler (or `model.scheduler`) must predict
    `model.prediction_type`."""
    sched_root = None if cfg.pretrained is None else _scheduler_root(Path(cfg.pretrained))
    sched_file = None if sched_root is None else sched_root / "scheduler" / "scheduler_config.json"
    if sched_file is None or not sched_file.is_file():
        return _scheduler_option_problems(cfg)
    try:
        declared = json.loads(sched_file.read_text()).get("prediction_type", "epsilon")
    except (OSError, ValueError, AttributeError) as exc:
        return [f"{sched_file}: not a readable scheduler config ({exc})"]
    if declared != cfg.prediction_type:
        return [f"model.prediction_type = {cfg.prediction_type!r} but the teacher's {sched_file} says {declared!r}; set model.prediction_type={declared}"]
    return []


def _scheduler(folder: Path | None, cfg: ModelConfig) -> tuple[Tensor, dict[str, Any], str]:
    from diffusers import DDPMScheduler

    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    else:
        kwargs = {"num_train_timesteps": cfg.num_train_timesteps, "prediction_type": cfg.prediction_type, **(cfg.scheduler or {})}
        sched = DDPMScheduler(**kwargs)
    ptype = sched.config.prediction_type
    if ptype != cfg.prediction_type:
        raise ModelLoadError(f"model.prediction_type = {cfg.prediction_type!r} but the teacher's scheduler says {ptype!r}; set model.prediction_type={ptype}")
    return sched.alphas_cumprod.float().clone(), dict(sched.config), ptype


def _sample_shape(model: nn.Module) -> tuple[int, int, int]:
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return (c.in_channels, size, size)


def load_teacher(cfg: ModelConfig, device: torch.device | str = "cpu") -> Teacher:
    """Build or load the teacher described by `cfg`; its parameters are frozen."""
    if cfg.family not in FAMILIES:
        raise ModelLoadError(f"model.family = {cfg.family!r}: known families are {sorted(FAMILIES)}")
    family = FAMILIES[cfg.family]
    dtype = getattr(torch, cfg.dtype)
    pipeline_dir = None
    if cfg.pretrained is not None:
        root = Path(cfg.pretrained)
        if (root / "model_index.json").is_file():
            pipeline_dir, sub = root, cfg.component or family.subfolder
        else:
            sub = None
        try:
            model = family.model_class().from_pretrained(root, subfolder=sub, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, SafetensorError) as exc:
            raise ModelLoadError(f"{root}: could not load a {family.class_name} ({_first_line(exc)}); point model.pretrained at a local diffusers folder") from None
        sched_root = _scheduler_root(root)
    else:
        model = family.model_class().from_config(dict(cfg.config or {}))
        if cfg.weights is not None:
            _load_weights(model, cfg.weights)
        model = cast_model(model, dtype)
        sched_root = None
    alphas, sched_cfg, ptype = _scheduler(sched_root, cfg)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return Teacher(
        backbone=model, family=cfg.family, alphas_cumprod=alphas, prediction_type=ptype,
        conditioning=cfg.conditioning, num_classes=cfg.num_classes, sample_shape=_sample_shape(model),
        scheduler_config=sched_cfg, pipeline_dir=pipeline_dir,
        source={"pretrained": cfg.pretrained, "weights": cfg.weights, "family": cfg.family},
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _is_pickle(path: str) -> bool:
    """A torch.save zip or a bare pickle (protocol 2+), by its first bytes."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError:
        return False
    return magic == b"PK" or (magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _load_weights(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict into `model`: every key and shape must match."""
    from safetensors.torch import load_file

    if Path(path).is_dir():
        raise ModelLoadError(f"{path}: model.weights is a folder; give the .safetensors file, or the folder as model.pretrained if it is a diffusers model")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as exc:
        hint = "; it is a torch/pickle checkpoint: convert it with safetensors.torch.save_file(torch.load(f, weights_only=True), 'teacher.safetensors')" if _is_pickle(path) else ""
        raise ModelLoadError(f"{path}: model.weights is not a readable safetensors file ({_first_line(exc)}){hint}") from None
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ModelLoadError(f"{path}: {len(missing)} missing and {len(unexpected)} unexpected keys for this model config (first missing: {missing[:2]}, first unexpected: {unexpected[:2]}); the weights belong to another model: check model.config and model.weights")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(f"{path}: {len(wrong)} tensor(s) have the wrong shape for this model config (first: {k} is {tuple(state[k].shape)}, the model wants {tuple(own[k].shape)}); the weights belong to another model: check model.config and model.weights")
    model.load_state_dict(state)


def save_model_folder(model: nn.Module, folder: Path, scheduler_config: dict[str, Any]) -> None:
    """Write a diffusers model folder plus the scheduler config next to it."""
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, default=str))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` in `dtype`, cast only where a parameter differs (diffusers' models log a warning
    on every `.to(dtype)`, even a no-op one)."""
    return model if all(p.dtype == dtype for p in model.parameters()) else model.to(dtype)
