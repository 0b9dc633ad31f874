"""An optional adversarial term (DMD2, Yin et al. 2024, §4.3): the fake score doubles as a
discriminator.

A small head reads the fake score's features at one sub-module (``vsd.gan_feature_module``,
the U-Net's ``mid_block`` by default) for a noised image and gives one logit. In the fake
score's update, the head and the fake adapter learn to tell noised real images
(``data.real_images``) from noised student samples (non-saturating loss, weight
``vsd.gan_d_weight`` beside the denoising loss); the student gets
``vsd.gan_weight * softplus(-logit)`` on its own noised samples, through the fake score, on
top of VSD. Real images are in the denoiser's space (pixels for a pixel model, VAE latents
for a latent one), in a safetensors file with ``images`` (N, C, H, W) and, for a class model,
``class_labels`` (N,).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wadi_train.errors import ConfigError

__all__ = ["Adversary", "DiscriminatorHead", "FeatureTap", "RealImages", "discriminator_loss", "generator_loss"]


class _StopForward(Exception):
    """Raised by an armed FeatureTap to end a forward at the tapped module."""


class FeatureTap:
    """Records the output of one sub-module during a `capture` block (a forward hook).

    Outside `capture` the hook does nothing, so the teacher's and the student's forwards
    through the same backbone leave no features behind. With ``stop`` (the default) the
    forward ends at the tapped module: the discriminator reads nothing after it, so the
    layers after it are not run (for the U-Net's mid_block, the whole up path).
    """

    def __init__(self, model: nn.Module, name: str):
        modules = dict(model.named_modules())
        if name not in modules:
            raise ConfigError(f"vsd.gan_feature_module = {name!r} is not a module of the denoiser; e.g. 'mid_block' (U-Net) or 'transformer_blocks.13' (PixArt)")
        self.features: Tensor | None = None
        self._armed = self._stop = False
        self._handle = modules[name].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed:
            return
        self.features = output[0] if isinstance(output, tuple) else output
        if self._stop:
            raise _StopForward

    @contextlib.contextmanager
    def capture(self, stop: bool = True) -> Iterator["FeatureTap"]:
        """Record the tapped output of the forward run in this block (and end it there with `stop`)."""
        self._armed, self._stop = True, stop
        try:
            yield self
        except _StopForward:
            pass
        finally:
            self._armed = self._stop = False

    def take(self) -> Tensor:
        """The features of the latest captured forward (each forward's are taken once)."""
        if self.features is None:
            raise RuntimeError("no features captured: run the fake score forward inside `capture()` first")
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self._handle.remove()


class DiscriminatorHead(nn.Module):
    """Features (B, C, H, W) or tokens (B, N, C) -> one logit per sample: a per-location MLP,
    averaged over locations."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return self.net(tokens.float()).mean(dim=1).squeeze(-1)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN loss of the discriminator: softplus(-D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating GAN loss of the generator: softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


class RealImages:
    """The real images of the adversarial term, sampled with replacement."""

    def __init__(self, path: str | Path, sample_shape: tuple[int, ...], conditioning: str):
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"data.real_images = {str(path)!r}: no such file; give a safetensors file with 'images' (N, C, H, W) in the denoiser's space")
        tensors = load_file(path)
        if "images" not in tensors:
            raise ConfigError(f"data.real_images = {str(path)!r} has no 'images' tensor (found {sorted(tensors)})")
        self.images = tensors["images"].float()
        if tuple(self.images.shape[1:]) != tuple(sample_shape):
            raise ConfigError(f"data.real_images: images are {tuple(self.images.shape[1:])} per sample but the denoiser works in {tuple(sample_shape)}")
        self.labels = tensors.get("class_labels")
        if conditioning == "class" and self.labels is None:
            raise ConfigError("data.real_images: a class-conditional model needs 'class_labels' (N,) beside 'images'")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ConfigError(f"data.real_images: {len(self.labels)} class_labels for {len(self.images)} images")

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """n images (and their labels, or None) drawn uniformly with replacement."""
        idx = torch.randint(len(self.images), (n,), generator=generator)
        return self.images[idx], None if self.labels is None else self.labels[idx].long()


@dataclass
class Adversary:
    """What a run with the adversarial term holds: the tap on the fake score, the head, the real images."""

    tap: FeatureTap
    head: DiscriminatorHead
    real: RealImages
