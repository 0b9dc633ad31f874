"""`wadi-train eval`: FID and CLIP score of an exported one-step student, as papers report them.

The protocol of COCO-30K evaluations: draw `n` captions from a caption file, generate one image
per caption in one step, and compare the images with reference images (FID in the 2048-dim
pool features of TensorFlow's Inception-v3, `inception.py`) and with their captions (CLIP
score, `clip_score.py`). Everything loads from local paths (`EvalConfig.inception_weights`,
`EvalConfig.clip`); nothing downloads. Work streams in batches: features go into a
`StatsAccumulator`, so 30K images never sit in memory.

Reference images (a folder) are centre-cropped to a square and resized to the generated
resolution with PIL's bicubic filter, then treated exactly like generated images (uint8 RGB
-> Inception). Reference statistics (`.npz` with mu and sigma: `save_stats` files, or
pytorch-fid / torch-fidelity / clean-fid ones) skip that step; `save_reference_stats` writes
the statistics of a folder for the next run.

`results.json` records the numbers with what produced them: sample count, resolution, seed,
prompt file hash, weight-file hashes and package versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wadi_train.evaluation.errors import EvaluationError
from wadi_train.evaluation.fid import (
    FeatureStats,
    StatsAccumulator,
    frechet_distance,
    load_stats,
    save_stats,
)

__all__ = ["EvalConfig", "evaluate_model", "load_eval_config", "reference_images", "reference_stats_of", "select_prompts"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class EvalConfig:
    """What to evaluate against and with which weights; a YAML file's keys, CLI flags override.

    Attributes:
        prompts: caption file (.txt, .csv/.tsv with a caption column, COCO captions .json, ...).
        reference: folder of reference images, or `.npz` statistics (mu, sigma).
        n: number of images to generate (COCO-30K: 30000).
        inception_weights: FID Inception-v3 state dict (pytorch-fid / torch-fidelity file).
        clip: local transformers CLIP folder.
        clip_score: compute the CLIP score (needs `clip`).
        prompt_column: caption column of a .csv/.tsv/.jsonl/.parquet (default: text, caption, prompt).
        seed: picks the captions (when the file has more than n) and seeds each sample's noise.
        batch_size: images per forward pass.
        resolution: generated image side in pixels (default: the training size).
        device: where everything runs.
        dtype: float32, float16 or bfloat16 for the student pipeline (default: float32 on CPU,
            else the export's).
        save_images: also write every generated image as OUT/images/NNNNN.png.
        save_reference_stats: write the reference folder's statistics to this `.npz`.
    """

    prompts: str | None = None
    reference: str | None = None
    n: int = 30000
    inception_weights: str | None = None
    clip: str | None = None
    clip_score: bool = True
    prompt_column: str | None = None
    seed: int = 0
    batch_size: int = 16
    resolution: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    save_images: bool = False
    save_reference_stats: str | None = None


def load_eval_config(path: str | Path | None, flags: dict[str, Any] | None = None) -> EvalConfig:
    """An `EvalConfig` from a YAML file (or defaults) with `flags` (set values only) on top.

    Raises:
        ConfigError: unreadable YAML, unknown keys or wrong types (every problem listed).
    """
    import yaml

    from wadi_train.config import _from_dict
    from wadi_train.errors import ConfigError

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such eval config file (--config)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: an eval config is a mapping of {', '.join(EvalConfig.__dataclass_fields__)}")
    data.update({k: (str(v) if isinstance(v, Path) else v) for k, v in (flags or {}).items() if v is not None})
    errors: list[str] = []
    config = _from_dict(EvalConfig, data, "", errors)
    if errors:
        raise ConfigError("invalid eval config:\n  " + "\n  ".join(errors))
    return config


def _problems(config: EvalConfig, output: Path) -> list[str]:
    """Everything wrong with the settings that can be seen without loading a model."""
    from wadi_train.config import folder_problem

    c, e = config, []
    if c.prompts is None:
        e.append("no caption file: pass --prompts FILE (.txt, .csv/.tsv, COCO captions .json)")
    elif not Path(c.prompts).is_file():
        e.append(f"--prompts {c.prompts}: no such file")
    if c.reference is None:
        e.append("no reference: pass --reference DIR (images) or --reference STATS.npz")
    elif not (Path(c.reference).is_dir() or Path(c.reference).is_file()):
        e.append(f"--reference {c.reference}: no such folder or file")
    elif Path(c.reference).is_file() and Path(c.reference).suffix.lower() != ".npz":
        e.append(f"--reference {c.reference}: give a folder of images or a .npz of statistics (mu, sigma)")
    if c.inception_weights is None:
        e.append("FID needs the Inception-v3 weights: pass --inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    elif not Path(c.inception_weights).is_file():
        e.append(f"--inception-weights {c.inception_weights}: no such file; pass the path of the FID Inception-v3 weights")
    if c.clip_score and c.clip is None:
        e.append("CLIP score needs a CLIP model: pass --clip FOLDER (a local transformers CLIP folder) or --no-clip-score")
    elif c.clip_score and not Path(c.clip).is_dir():  # type: ignore[arg-type]
        e.append(f"--clip {c.clip}: no such folder; pass a local transformers CLIP folder (config.json, weights, tokenizer, preprocessor_config.json)")
    if c.n < 2:
        e.append(f"-n {c.n}: FID needs at least 2 images")
    if c.batch_size < 1:
        e.append(f"--batch-size {c.batch_size}: must be at least 1")
    if c.resolution is not None and c.resolution < 1:
        e.append(f"--resolution {c.resolution}: must be positive")
    if c.dtype not in (None, "float32", "float16", "bfloat16"):
        e.append(f"--dtype {c.dtype}: use float32, float16 or bfloat16")
    unwritable = folder_problem("-o", output)
    if unwritable:
        e.append(unwritable)
    return e


def select_prompts(prompts: list[str], n: int, seed: int) -> tuple[list[str], str]:
    """The n captions to generate from, and how they were chosen.

    More captions than n (COCO's 5 per image): a seeded random subset without replacement,
    kept in file order. n or fewer: all of them in file order, cycled to n.
    """
    if len(prompts) > n:
        idx = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
        return [prompts[i] for i in idx], f"random subset of {n} of {len(prompts)} (numpy default_rng({seed}).choice, file order)"
    if len(prompts) < n:
        log.warning("the caption file has %d captions for %d images: cycling through them", len(prompts), n)
    return [prompts[i % len(prompts)] for i in range(n)], f"all {len(prompts)} in file order" + (", cycled" if len(prompts) < n else "")


def reference_images(folder: str | Path) -> list[Path]:
    """Image files (png, jpg, jpeg, webp, bmp) under `folder`, recursively, sorted."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise EvaluationError(f"{folder}: {len(files)} reference image(s) ({', '.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    return files


def _load_square(path: Path, size: int) -> Tensor:
    """(3, size, size) uint8: RGB, centre-cropped to a square, bicubic-resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            im = file.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise EvaluationError(f"{path}: not a readable image ({exc}); remove it from the reference folder") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


def _batches(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


@torch.no_grad()
def reference_stats_of(folder: str | Path, inception: torch.nn.Module, size: int, batch_size: int = 16, progress: Progress | None = None) -> FeatureStats:
    """Inception statistics of a folder of images preprocessed to `size` px (see module doc)."""
    files = reference_images(folder)
    device = next(inception.parameters()).device
    acc = StatsAccumulator()
    for start, chunk in _batches(files, batch_size):
        images = torch.stack([_load_square(p, size) for p in chunk])  # (B, 3, size, size) uint8
        acc.update(inception(images.to(device)))
        if progress:
            progress("reference", start + len(chunk), len(files))
    return acc.stats()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file under a model folder, by relative path."""
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.suffix in suffixes and p.is_file()}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("weightlens", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
    # wadi_train ships in the `weightlens` distribution; a source checkout has only __version__.
    found["wadi_train"] = found.pop("weightlens") or _package_version()
    return found


def _package_version() -> str:
    from wadi_train import __version__

    return __version__


def _reference(config: EvalConfig, inception: torch.nn.Module, size: int, progress: Progress | None) -> tuple[FeatureStats, dict[str, Any]]:
    path = Path(config.reference)  # type: ignore[arg-type]
    if path.is_file():
        stats = load_stats(path)
        if stats.dim != 2048:
            raise EvaluationError(f"{path}: statistics of {stats.dim}-dim features; FID here uses Inception's 2048-dim pool features, so compute them with the same network")
        return stats, {"path": str(path), "kind": "stats", "sha256": _sha256(path), "n": stats.n}
    files = reference_images(path)
    stats = reference_stats_of(path, inception, size, config.batch_size, progress)
    listing = hashlib.sha256("\n".join(f"{p.relative_to(path)}\t{p.stat().st_size}" for p in files).encode()).hexdigest()
    record = {"path": str(path), "kind": "images", "n": stats.n, "listing_sha256": listing, "preprocess": f"RGB, centre crop to square, PIL bicubic resize to {size}x{size}, uint8"}
    if config.save_reference_stats:
        record["saved_stats"] = str(save_stats(stats, config.save_reference_stats))
    return stats, record


def evaluate_model(model: str | Path, output: str | Path, config: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Generate `config.n` images from an export and score them; writes OUT/results.json.

    Args:
        model: a `wadi-train export` folder (text-conditioned SD pipeline or class-conditional).
        output: folder for results.json, samples.png (the first 16 images) and, with
            `save_images`, images/.
        config: the settings (see `EvalConfig`).
        progress: called as progress(stage, done, total) for stages "reference" and "generate".

    Returns:
        The results record written to results.json.

    Raises:
        EvaluationError (or another WadiError): settings, weights or inputs that cannot work;
        problems visible without loading anything are reported together.
    """
    from wadi_train.data import read_prompts
    from wadi_train.evaluation.clip_score import load_clip
    from wadi_train.evaluation.inception import load_inception
    from wadi_train.evaluation.text_to_image import load_sampler
    from wadi_train.generate import read_export_info, save_grid

    start_time = time.perf_counter()
    out, root = Path(output), Path(model)
    problems = _problems(config, out)
    if problems:
        raise EvaluationError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    info = read_export_info(root)
    all_prompts = read_prompts(config.prompts, config.prompt_column)  # type: ignore[arg-type]
    prompts, selection = select_prompts(all_prompts, config.n, config.seed)
    inception = load_inception(config.inception_weights, config.device)
    clip = load_clip(config.clip, config.device) if config.clip_score else None
    sampler = load_sampler(root, config.device, config.dtype, config.resolution, config.seed)
    sampler.check(prompts)
    ref_stats, ref_record = _reference(config, inception, sampler.resolution, progress)

    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    if config.save_images:
        images_dir.mkdir(exist_ok=True)
    acc = StatsAccumulator()
    clip_scores: list[Tensor] = []
    preview: list[Tensor] = []
    for start, chunk in _batches(prompts, config.batch_size):
        images = sampler(chunk, list(range(start, start + len(chunk))))  # (B, 3, R, R) uint8
        acc.update(inception(images.to(config.device)))
        if clip is not None:
            clip_scores.append(clip.pair_scores(images, chunk))
        if len(preview) < 16:
            preview.extend(images[: 16 - len(preview)])
        if config.save_images:
            _write_pngs(images, images_dir, start)
        if progress:
            progress("generate", start + len(chunk), len(prompts))
    save_grid(torch.stack(preview).float() / 127.5 - 1, out / "samples.png", upscale=1)
    scores = torch.cat(clip_scores) if clip_scores else None
    results = {
        "model": str(root),
        "export": {k: info.get(k) for k in ("family", "conditioning", "method", "step", "ema", "run", "checkpoint", "dtype")},
        "fid": frechet_distance(acc.stats(), ref_stats),
        "clip_score": None if scores is None else float(scores.mean()),
        "clip_score_std": None if scores is None else float(scores.std()) if len(scores) > 1 else 0.0,
        "n": acc.n, "resolution": sampler.resolution, "seed": config.seed, "batch_size": config.batch_size,
        "device": config.device, "sampler": sampler.describe,
        "prompts": {
            "file": str(config.prompts), "sha256": _sha256(Path(config.prompts)), "captions_in_file": len(all_prompts),  # type: ignore[arg-type]
            "column": config.prompt_column, "selection": selection, "used_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        },
        "reference": ref_record,
        "weights": {
            "inception": {"path": str(config.inception_weights), "sha256": _sha256(Path(config.inception_weights))},  # type: ignore[arg-type]
            "clip": None if clip is None else {"path": str(config.clip), "sha256": _weight_hashes(Path(config.clip))},  # type: ignore[arg-type]
            "model": _weight_hashes(root),
        },
        "definitions": {
            "fid": "Frechet distance of Inception-v3 (TensorFlow 2015-12-05 graph) 2048-d pool features; images as uint8 RGB, TF1 bilinear resize to 299",
            "clip_score": "mean over images of 100 * max(cos(CLIP image embedding, CLIP text embedding), 0) (torchmetrics CLIPScore)",
        },
        "config": asdict(config),
        "versions": _versions(),
        "command": sys.argv,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log.info("FID %.4g, CLIP score %s over %d images: %s", results["fid"], results["clip_score"], acc.n, out / "results.json")
    return results


def _write_pngs(images: Tensor, folder: Path, start: int) -> None:
    from PIL import Image

    for j, im in enumerate(images.permute(0, 2, 3, 1).numpy()):  # (B, R, R, 3)
        Image.fromarray(im).save(folder / f"{start + j:05d}.png")
