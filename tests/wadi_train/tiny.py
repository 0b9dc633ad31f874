"""The tiny class-conditional U-Net and run-config builder shared by the wadi_train tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
    "layers_per_block": 1, "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"], "mid_block_type": None,
    "num_class_embeds": 11, "norm_num_groups": 8, "attention_head_dim": 8,
}


def tiny_config(tmp_path: Path, teacher: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A run config dict for the tiny teacher; `sections` update each section."""
    cfg: dict[str, Any] = {
        "name": "tiny", "output_dir": str(tmp_path / "run"),
        "model": {"config": TINY_UNET, "weights": str(teacher), "num_classes": 10},
        "adapter": {"method": "lorad", "rank": 4},
        "fake": {"rank": 2},
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "ema_decay": 0.9, "seed": 3},
    }
    for key, update in sections.items():
        cfg.setdefault(key, {}).update(update)
    return cfg
