"""The embedded default's data and judge: scikit-learn's bundled 8x8 digits and a small CNN.

`load_digits_split` gives a fixed stratified train/test split of the 1797 digits (bundled with
scikit-learn, nothing downloads) scaled to [-1, 1], natively 8x8 or upsampled to 16x16. A
`DigitsClassifier` trained on the train split judges generated samples: its penultimate
64-dim features give a digits FID against the test split (`reference_stats`), and its
predictions give the fraction of samples that show the digit they were conditioned on
(`evaluate_samples`). `load_or_train_classifier` caches the trained judge as safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from wadi_train.evaluation.errors import EvaluationError
from wadi_train.evaluation.fid import FeatureStats, feature_stats, frechet_distance

__all__ = [
    "SIZES",
    "NUM_CLASSES",
    "FEATURE_DIM",
    "DigitsSplit",
    "load_digits_split",
    "DigitsClassifier",
    "train_classifier",
    "classifier_accuracy",
    "load_or_train_classifier",
    "extract_features",
    "reference_stats",
    "SampleMetrics",
    "evaluate_samples",
]

log = logging.getLogger(__name__)

SIZES = (8, 16)
NUM_CLASSES = 10
FEATURE_DIM = 64
DEFAULT_EPOCHS = 15
_PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed stratified split of the digits; images (N, 1, H, W) float32 in [-1, 1]."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def size(self) -> int:
        """Image side H (= W) in pixels."""
        return int(self.x_train.shape[-1])


def load_digits_split(size: int = 8, test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """The bundled digits, split with `train_test_split(stratify=y, random_state=seed)`.

    Args:
        size: 8 (native) or 16 (bilinear upsample, align_corners=False, clamped to [-1, 1]).
        test_fraction: share of each class held out as the test split, in (0, 1).
        seed: random_state of the split.

    Returns:
        A `DigitsSplit` with pixel / 8 - 1 images and long labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size not in SIZES:
        raise EvaluationError(f"digits size must be one of {SIZES}, got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise EvaluationError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32)).unsqueeze(1)  # (1797, 1, 8, 8)
    images = images / (_PIXEL_MAX / 2) - 1.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(-1.0, 1.0)
    labels = torch.from_numpy(data.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=data.target, random_state=seed
    )
    tr, te = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return DigitsSplit(
        x_train=images[tr].contiguous(), y_train=labels[tr],
        x_test=images[te].contiguous(), y_test=labels[te],
    )


class DigitsClassifier(nn.Module):
    """Small CNN: conv 32 -> conv 64 (BatchNorm) -> pool to 2x2 -> 64 features -> 10 logits.

    The adaptive pool makes it work for any input size; `size` records the side it is meant
    for so that evaluation can refuse samples of another resolution.
    """

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        if size not in SIZES:
            raise EvaluationError(f"DigitsClassifier size must be one of {SIZES}, got {size}")
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (B, 256): keeps a coarse 2x2 layout
            nn.Linear(256, FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, 64) of images (B, 1, H, W) in [-1, 1]; used for FID."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.dropout(self.features(x)))


def _augment(x: Tensor, generator: torch.Generator, noise_std: float) -> Tensor:
    """Random shift of up to +-1 px per image (background -1 fills in) plus Gaussian noise."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, H+2, W+2)
    dy, dx = torch.randint(0, 3, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 1, h, w + 2)
    shifted = padded.gather(2, rows)  # (B, 1, H, W+2)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, 1, h, w)
    shifted = shifted.gather(3, cols)  # (B, 1, H, W)
    return shifted + noise_std * torch.randn(shifted.shape, generator=generator)


@contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    split: DigitsSplit,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    noise_std: float = 0.1,
    num_threads: int | None = 1,
) -> DigitsClassifier:
    """Train a `DigitsClassifier` on `split.x_train`; deterministic given `seed` on one machine.

    AdamW with a one-cycle schedule; each batch is shifted by up to +-1 px and gets Gaussian
    noise. The global torch RNG is left as it was. About 10 s at 8px and 25 s at 16px with
    the default 15 epochs on a busy 2-core CPU (98-99% test accuracy).

    Args:
        split: the data; trains on the train split, reports accuracy on the test split.
        epochs: passes over the train split.
        seed: seeds the initial weights, batch order and augmentation.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule.
        noise_std: standard deviation of the Gaussian noise added to each training image.
        num_threads: torch intra-op threads while training, restored afterwards. Batches of
            64 tiny images are too small to split: on a shared 2-core machine 2 threads ran
            ~10x slower per step than 1. None keeps the current setting.

    Returns:
        The trained classifier in eval mode, on CPU.
    """
    if epochs < 1 or batch_size < 2:
        raise EvaluationError(
            f"need epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}"
        )
    start = time.perf_counter()
    # Dropout draws from the global RNG: seed a forked copy so that the weights depend on
    # `seed` alone and the caller's RNG stream is untouched.
    with torch.random.fork_rng(devices=[]), _intra_op_threads(num_threads):
        torch.manual_seed(seed)
        model = DigitsClassifier(size=split.size)
        gen = torch.Generator().manual_seed(seed)  # batch order and augmentation
        _fit(model, split, epochs, batch_size, lr, noise_std, gen)
    model.eval()
    acc = classifier_accuracy(model, split.x_test, split.y_test)
    log.info(
        "trained %dpx digits classifier: %d epochs in %.1fs, test accuracy %.4f",
        split.size, epochs, time.perf_counter() - start, acc,
    )
    return model


def _fit(
    model: DigitsClassifier, split: DigitsSplit, epochs: int, batch_size: int, lr: float,
    noise_std: float, gen: torch.Generator,
) -> None:
    """The training loop: AdamW, one-cycle learning rate, augmented shuffled batches."""
    n = len(split.y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * -(-n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            x = _augment(split.x_train[idx], gen, noise_std)
            loss = F.cross_entropy(model(x), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.debug("digits classifier epoch %d/%d: last loss %.4f", epoch + 1, epochs, loss.item())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _predict(classifier: DigitsClassifier, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Features (N, 64) float64 and predicted labels (N,) on CPU, computed in batches."""
    _check_images(classifier, x)
    was_training = classifier.training
    classifier.eval()
    device = _device(classifier)
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = classifier.features(x[i : i + batch_size].to(device, torch.float32))
        feats.append(f.to("cpu", torch.float64))
        preds.append(classifier.head(f).argmax(dim=1).cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(preds)


def _check_images(classifier: DigitsClassifier, x: Tensor) -> None:
    expected = (1, classifier.size, classifier.size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise EvaluationError(
            f"images must have shape (N, {', '.join(map(str, expected))}) for this "
            f"{classifier.size}px classifier, got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise EvaluationError("images contain NaN or inf")


def classifier_accuracy(
    classifier: DigitsClassifier, x: Tensor, y: Tensor, batch_size: int = 512
) -> float:
    """Fraction of images (N, 1, H, W) whose predicted class equals `y` (N,)."""
    _, preds = _predict(classifier, x, batch_size)
    return float((preds == y.cpu()).double().mean())


def extract_features(classifier: DigitsClassifier, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate features (N, 64), float64 on CPU, of images (N, 1, H, W) in [-1, 1]."""
    return _predict(classifier, x, batch_size)[0]


def reference_stats(classifier: DigitsClassifier, split: DigitsSplit) -> FeatureStats:
    """Feature statistics of the test split: the reference a generator's FID is measured to."""
    return feature_stats(extract_features(classifier, split.x_test))


@dataclass(frozen=True)
class SampleMetrics:
    """How a batch of class-conditional samples scores under the digits judge.

    Attributes:
        fid: Fréchet distance of the samples' features to the reference statistics.
        accuracy: fraction of samples the classifier assigns to their conditioning label.
        n: number of samples.
    """

    fid: float
    accuracy: float
    n: int


def evaluate_samples(
    classifier: DigitsClassifier,
    samples: Tensor,
    labels: Tensor,
    reference: FeatureStats,
    batch_size: int = 512,
) -> SampleMetrics:
    """Digits FID and conditional accuracy of generated samples.

    Args:
        classifier: a trained judge of the samples' resolution.
        samples: images (N, 1, H, W) in [-1, 1], N >= 2; any device.
        labels: conditioning labels (N,) in 0..9.
        reference: statistics to compare with, usually `reference_stats(classifier, split)`.
        batch_size: images per forward pass (under torch.no_grad).

    Returns:
        A `SampleMetrics` record.
    """
    if labels.ndim != 1 or len(labels) != len(samples):
        raise EvaluationError(
            f"labels must have shape ({len(samples)},), got {tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise EvaluationError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    feats, preds = _predict(classifier, samples, batch_size)
    accuracy = float((preds == labels.cpu().long()).double().mean())
    fid = frechet_distance(feature_stats(feats), reference)
    return SampleMetrics(fid=fid, accuracy=accuracy, n=len(labels))


def _cache_paths(cache_dir: Path, size: int) -> tuple[Path, Path]:
    return cache_dir / f"classifier-{size}px.safetensors", cache_dir / f"classifier-{size}px.json"


def _load_cached(weights: Path, meta: Path, size: int, seed: int) -> DigitsClassifier | None:
    """The cached classifier, or None (with a warning if the cache exists but is unusable)."""
    if not weights.exists():
        return None
    try:
        info = json.loads(meta.read_text()) if meta.exists() else {}
        if not isinstance(info, dict):
            raise ValueError(f"{meta.name} is not a JSON object")
        if info.get("seed", seed) != seed:
            log.info(
                "cached %s was trained with seed %s, not %d; retraining", weights, info["seed"], seed
            )
            return None
        model = DigitsClassifier(size=size)
        # strict: a missing key, an extra key or a wrong shape raises RuntimeError
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        log.warning("cached digits classifier %s is unusable (%s); retraining it", weights, exc)
        return None
    log.info(
        "loaded %dpx digits classifier from %s (test accuracy %s)",
        size, weights, info.get("test_accuracy"),
    )
    return model.eval()


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves a half-written cache."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def load_or_train_classifier(
    cache_dir: Path,
    split: DigitsSplit,
    size: int,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
) -> DigitsClassifier:
    """The digits judge for `size`, from `cache_dir` if cached there, else trained and cached.

    The cache is `classifier-{size}px.safetensors` plus `classifier-{size}px.json` (test
    accuracy, seed, epochs). A broken or mismatched weights file is logged as a warning and
    replaced by a freshly trained classifier.

    Args:
        cache_dir: folder for the cache; created if missing.
        split: the data to train on; its image size must equal `size`.
        size: 8 or 16.
        seed: training seed; a cache trained with another seed is retrained.
        epochs: training epochs when there is no usable cache.

    Returns:
        The classifier in eval mode, on CPU.
    """
    if split.size != size:
        raise EvaluationError(
            f"split images are {split.size}px but size={size}; load the split with size={size}"
        )
    cache_dir = Path(cache_dir)
    weights, meta = _cache_paths(cache_dir, size)
    model = _load_cached(weights, meta, size, seed)
    if model is not None:
        return model
    model = train_classifier(split, epochs=epochs, seed=seed)
    info = {
        "size": size, "seed": seed, "epochs": epochs,
        "test_accuracy": round(classifier_accuracy(model, split.x_test, split.y_test), 6),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights, lambda p: save_file(state, str(p)))
    _atomic_write(meta, lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n"))
    log.info("cached %dpx digits classifier in %s", size, weights)
    return model
