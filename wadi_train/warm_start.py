"""Analysis-informed start: initialise the student's LoRaD factors from a reference pair.

`weightlens compare REF_TEACHER REF_STUDENT -o OUT` records both files in OUT/summary.json.
For every layer carrying the student adapter, the implied rotation Theta of the reference
pair is recomputed (weightlens' own maths) and its best rank-r approximation U_r S_r V_r^T is
split as theta_a = U_r S_r^1/2, theta_b = S_r^1/2 V_r^T, so the student starts as the
reference's low-rank rotation instead of the identity. Directions the reference leaves unused
(zero singular values) keep LoRaD's init (theta_a 0, theta_b random) so they can still train.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from wadi_train.errors import ConfigError
from weightlens.align import align_keys
from weightlens.io import open_checkpoint
from weightlens.rotation import implied_angles

__all__ = ["warm_start_from_analysis", "low_rank_factors"]

log = logging.getLogger(__name__)


def low_rank_factors(theta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, r) and (r, k) factors whose product is the best rank-r approximation of theta."""
    u, s, vh = torch.linalg.svd(theta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    a = torch.zeros(theta.shape[0], rank, dtype=torch.float64)
    b = torch.zeros(rank, theta.shape[1], dtype=torch.float64)
    a[:, :r] = u[:, :r] * root
    b[:r] = root[:, None] * vh[:r]
    return a.float(), b.float()


def _unused_directions(b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(r,) mask of the factor rows whose singular value is zero to float32 precision."""
    s = b.double().square().sum(dim=1)  # row norms^2 of S^1/2 V^T: the singular values
    return s <= s.max() * max(shape) * torch.finfo(torch.float32).eps


def warm_start_from_analysis(roles: Any, analysis_dir: str | Path) -> str:
    """Set the student adapter's theta_a/theta_b from the reference pair of a weightlens analysis.

    Returns a provenance string naming the reference files and how many layers were set.
    """
    from wadi_train.lorad import lorad_layers

    if roles.method != "lorad":
        raise ConfigError("adapter.init_from_analysis only applies to adapter.method = lorad")
    summary_path = Path(analysis_dir) / "summary.json"
    try:
        prov = json.loads(summary_path.read_text())["provenance"]
        t_path, s_path = prov["teacher"]["path"], prov["student"]["path"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{summary_path}: not a weightlens analysis with teacher/student provenance ({exc})") from None
    teacher, student = open_checkpoint(t_path), open_checkpoint(s_path)
    try:
        pairs = {p.name.removesuffix(".weight"): p for p in align_keys(teacher.infos, student.infos).pairs}
        done = 0
        for name, layer in lorad_layers(roles.teacher.backbone):
            if "student" not in layer.theta_a or name not in pairs:
                continue
            p = pairs[name]
            wt = teacher.get(p.teacher_key).reshape(p.shape[0], -1)
            ws = student.get(p.student_key).reshape(p.shape[0], -1)
            theta = implied_angles(wt, ws)
            a, b = low_rank_factors(theta, layer.theta_a["student"].shape[1])
            # A direction the reference does not use (zero singular value, e.g. an unchanged
            # layer) would get a zero theta_a column *and* a zero theta_b row: both gradients
            # vanish there for good. Keep LoRaD's own init there (theta_a 0, theta_b random).
            unused = _unused_directions(b, theta.shape)
            b[unused] = layer.theta_b["student"].detach().float().cpu()[unused]
            a[:, unused] = 0
            with torch.no_grad():
                layer.theta_a["student"].copy_(a)
                layer.theta_b["student"].copy_(b)
            done += 1
    finally:
        teacher.close()
        student.close()
    if done == 0:
        raise ConfigError(f"{analysis_dir}: no student LoRaD module matches a layer of the reference pair")
    log.info("warm start: %d LoRaD layers from %s vs %s", done, t_path, s_path)
    return f"warm start from {t_path} vs {s_path} ({done} layers, truncated SVD of Theta)"
