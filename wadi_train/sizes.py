"""Parameter counts of a run's student and fake score, computed on the `meta` device.

`wadi-train validate` prints them before any weights are read, so a config can be checked
against the paper's figures (83.80M for SD1.5 at rank 256) without a GPU or a download.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from wadi_train.config import RunConfig
from wadi_train.lorad import LoRaDConfig, count_lorad_params, resolve_targets
from wadi_train.models import FAMILIES

__all__ = ["meta_backbone", "trainable_counts", "describe"]


def meta_backbone(config: RunConfig) -> nn.Module:
    """The denoiser built on the meta device from config (no memory, no weights)."""
    family = FAMILIES[config.model.family]
    if config.model.config is not None:
        cfg = dict(config.model.config)
    else:
        root = Path(config.model.pretrained or ".")
        sub = root / (config.model.component or family.subfolder) if (root / "model_index.json").is_file() else root
        cfg = json.loads((sub / "config.json").read_text())
    with torch.device("meta"):
        return family.model_class().from_config(cfg)


def _lorad_count(model: nn.Module, cfg: LoRaDConfig) -> tuple[int, int]:
    return len(resolve_targets(model, cfg)), count_lorad_params(model, cfg)


def trainable_counts(config: RunConfig) -> dict[str, tuple[int, int]]:
    """{'backbone': (tensors, params), 'student': (modules, params), 'fake': (modules, params)}."""
    from wadi_train.adapters import _fake_lorad, student_lorad_config

    model = meta_backbone(config)
    counts = {"backbone": (sum(1 for _ in model.parameters()), sum(p.numel() for p in model.parameters()))}
    a = config.adapter
    if a.method == "lorad":
        counts["student"] = _lorad_count(model, student_lorad_config(a))
    elif a.method in ("lora", "dora"):
        mods = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(a.target_modules, n)]
        counts["student"] = (len(mods), sum(a.rank * (m.in_features + m.out_features) + (m.out_features if a.method == "dora" else 0) for m in mods))
    else:
        counts["student"] = counts["backbone"]
    counts["fake"] = _lorad_count(model, _fake_lorad(config.fake))
    return counts


def describe(config: RunConfig) -> list[str]:
    """Human-readable lines: backbone size, student and fake-score trainable parameters."""
    c = trainable_counts(config)
    bb = c["backbone"][1]
    lines = [f"backbone: {config.model.family}, {bb / 1e6:.2f}M parameters"]
    for role in ("student", "fake"):
        mods, params = c[role]
        lines.append(f"{role}: {config.adapter.method if role == 'student' else 'lorad'}, {mods} modules, {params / 1e6:.2f}M trainable parameters ({params / bb:.2%} of the backbone)")
    return lines
