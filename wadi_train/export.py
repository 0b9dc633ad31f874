"""`wadi-train export RUN -o OUT`: merge the student into the backbone and write it for diffusers.

Merging happens in fp32, then the weights are cast to the teacher's dtype (or `dtype`).
OUT gets a diffusers model folder (`model/`), or a whole pipeline folder with the denoiser
replaced when the teacher was a pipeline; the adapter alone (`adapter.safetensors`); and
`wadi_export.json` (family, prediction type, noise schedule, provenance) for `generate`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from wadi_train.adapters import build_roles
from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
from wadi_train.config import folder_problem, load_config
from wadi_train.errors import ConfigError
from wadi_train.models import FAMILIES, load_teacher

__all__ = ["export_run"]

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out: str | Path, use_ema: bool = False, dtype: str | None = None, overwrite: bool = False, checkpoint: str | Path | None = None) -> Path:
    """Export the latest (or given) checkpoint of a run; returns OUT."""
    run, out = Path(run_dir), Path(out)
    unwritable = folder_problem("-o", out)
    if unwritable:
        raise ConfigError(unwritable)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty; pass --overwrite or choose another -o")
    ck_path = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if ck_path is None:
        raise ConfigError(f"{run}: no checkpoint found; train first (`wadi-train run CONFIG`)")
    config = load_config(run / "config.yaml")
    teacher = load_teacher(config.model)
    roles = build_roles(teacher, config.adapter, config.fake)
    ck = load_checkpoint(ck_path)
    student = ck.tensors["ema"] if use_ema and "ema" in ck.tensors else ck.tensors["student"]
    if use_ema and "ema" not in ck.tensors:
        log.warning("the checkpoint has no EMA weights; exporting the raw student")
    roles.load_states(student, ck.tensors["fake"])
    merged = roles.merged_student()
    if dtype:
        merged = merged.to(getattr(torch, dtype))
    family = FAMILIES[config.model.family]
    out.mkdir(parents=True, exist_ok=True)
    if teacher.pipeline_dir is not None:
        sub = config.model.component or family.subfolder
        shutil.copytree(teacher.pipeline_dir, out, ignore=shutil.ignore_patterns(sub), dirs_exist_ok=True)
        merged.save_pretrained(out / sub, safe_serialization=True)
    else:
        merged.save_pretrained(out / "model", safe_serialization=True)
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(teacher.scheduler_config, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in roles.adapter_file_state().items()}, out / "adapter.safetensors", metadata={"method": roles.method})
    info = {
        "family": config.model.family, "prediction_type": teacher.prediction_type, "conditioning": config.model.conditioning,
        "num_classes": teacher.num_classes, "generator_timestep": config.vsd.generator_timestep,
        "alphas_cumprod": [float(a) for a in teacher.alphas_cumprod], "method": config.adapter.method,
        "step": ck.step, "run": str(run), "checkpoint": str(ck_path), "ema": bool(use_ema and "ema" in ck.tensors),
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
    }
    (out / "wadi_export.json").write_text(json.dumps(info, indent=2))
    log.info("exported step %d of %s to %s", ck.step, run, out)
    return out
