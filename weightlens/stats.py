"""Per-layer statistics of a teacher -> student weight change (DESIGN §3).

Pure functions of tensors: the caller picks device and dtype. Maths in float32, reductions
over rows and matrices accumulated in float64. Rows are output units; conv kernels are
flattened to (out, in*kh*kw) by :func:`as_matrix`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from weightlens.rotation import implied_angles, rotate_pairs

__all__ = [
    "RowChange",
    "SpectrumStats",
    "MatrixStats",
    "as_matrix",
    "row_change",
    "rotation_explained",
    "energies",
    "spectrum_stats",
    "random_energy_30",
    "marchenko_pastur_energy",
    "matrix_stats",
]

ENERGY_TARGET = 0.9
RANK_FRACTION = 0.3


def as_matrix(weight: Tensor) -> Tensor:
    """Flatten a weight to (out, rest) float32: rows are output units."""
    return weight.reshape(weight.shape[0], -1).float()


@dataclass(frozen=True)
class RowChange:
    """Per-row change of one layer, over the rows where both norms are non-zero.

    Attributes:
        norm_rel: |m_S - m_T| / m_T per row, float64.
        dir: ||u_S - u_T|| per row (= 2 sin(phi/2)), float64.
        angle_deg: phi in degrees per row, float64.
        one_minus_cos: 1 - cos(phi) per row, float64.
        valid: bool mask over all rows: True where both norms are non-zero.
        unit_teacher: row-normalised teacher (zero rows left at zero), float32.
        unit_student: row-normalised student, float32.
    """

    norm_rel: Tensor
    dir: Tensor
    angle_deg: Tensor
    one_minus_cos: Tensor
    valid: Tensor
    unit_teacher: Tensor
    unit_student: Tensor

    @property
    def excluded(self) -> int:
        """Rows left out because a norm was zero."""
        return int((~self.valid).sum())


def _row_norms(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w, dim=1, dtype=torch.float64)  # (out,)


def row_change(teacher: Tensor, student: Tensor) -> RowChange:
    """Norm and direction change of every row.

    ``dir`` is computed from the difference of unit vectors, not from the cosine: for the
    tiny angles distillation produces, 1 - cos loses all precision in float32.
    """
    wt, ws = as_matrix(teacher), as_matrix(student)
    mt, ms = _row_norms(wt), _row_norms(ws)
    valid = (mt > 0) & (ms > 0)
    safe_t = torch.where(valid, mt, torch.ones_like(mt)).float().unsqueeze(1)
    safe_s = torch.where(valid, ms, torch.ones_like(ms)).float().unsqueeze(1)
    keep = valid.unsqueeze(1)
    ut = torch.where(keep, wt / safe_t, torch.zeros_like(wt))  # (out, in)
    us = torch.where(keep, ws / safe_s, torch.zeros_like(ws))
    direction = torch.linalg.vector_norm(us - ut, dim=1, dtype=torch.float64)[valid]
    angle = 2.0 * torch.arcsin(torch.clamp(direction / 2.0, max=1.0))
    return RowChange(
        norm_rel=((ms - mt).abs() / mt)[valid],
        dir=direction,
        angle_deg=torch.rad2deg(angle),
        one_minus_cos=direction.square() / 2.0,
        valid=valid,
        unit_teacher=ut,
        unit_student=us,
    )


def rotation_explained(teacher: Tensor, student: Tensor, theta: Tensor) -> float:
    """Share of ||W_S - W_T||_F^2 that rotating teacher pairs by ``theta`` explains.

    Returns NaN for an unchanged layer (the share is undefined).
    """
    wt, ws = as_matrix(teacher), as_matrix(student)
    change = torch.linalg.vector_norm(ws - wt, dtype=torch.float64).square()
    if change == 0:
        return math.nan
    resid = torch.linalg.vector_norm(ws - rotate_pairs(wt, theta), dtype=torch.float64).square()
    return float(1.0 - resid / change)


def energies(matrix: Tensor) -> Tensor:
    """Squared singular values of ``matrix``, descending, float64 (on the input's device).

    A float32 Gram-matrix eigensolve on the smaller side: energy shares (the only figures
    reported) are exact to ~1e-6, see tests/weightlens/test_stats.py.
    """
    m = matrix.float()
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    values = torch.linalg.eigvalsh(gram).double().clamp_min(0.0)
    return torch.flip(values, dims=(0,))


@dataclass(frozen=True)
class SpectrumStats:
    """Energy figures of one spectrum."""

    rank_90: int
    energy_30: float


def spectrum_stats(energy: Tensor | np.ndarray, shape: tuple[int, int]) -> SpectrumStats:
    """rank at 90 % energy and energy share of the top ceil(0.3*min(shape)) values."""
    e = torch.as_tensor(energy, dtype=torch.float64).cpu()
    total = float(e.sum())
    if total <= 0:
        return SpectrumStats(rank_90=0, energy_30=math.nan)
    cum = torch.cumsum(e, 0) / total
    # 1e-12 slack: a spectrum whose first k values hold exactly 90 % must read rank k.
    rank_90 = int(torch.searchsorted(cum, torch.tensor(ENERGY_TARGET - 1e-12, dtype=torch.float64)))
    k = min(math.ceil(RANK_FRACTION * min(shape)), len(e))
    return SpectrumStats(rank_90=min(rank_90 + 1, len(e)), energy_30=float(cum[k - 1]))


EXACT_BASELINE_MAX = 256  # up to this min(shape) the baseline is a sampled matrix


@lru_cache(maxsize=512)
def random_energy_30(rows: int, cols: int) -> float:
    """energy_30 of a Gaussian matrix of this shape: the null baseline.

    Small shapes: a seeded sample (exact for that matrix). Larger ones: the Marchenko-Pastur
    limit, which a sample matches to ~1e-3 there (tests/weightlens/test_stats.py) at no cost.
    """
    if min(rows, cols) <= EXACT_BASELINE_MAX:
        gen = torch.Generator().manual_seed(rows * 1_000_003 + cols)
        sample = torch.randn(rows, cols, generator=gen)
        return spectrum_stats(energies(sample), (rows, cols)).energy_30
    return marchenko_pastur_energy(min(rows, cols) / max(rows, cols), RANK_FRACTION)


def marchenko_pastur_energy(ratio: float, top_fraction: float, grid: int = 200_001) -> float:
    """Share of sum(eigenvalues) held by the top `top_fraction` of them under Marchenko-Pastur.

    For an m x n Gaussian matrix (m <= n, ratio = m/n) the eigenvalues of X X^T / n follow
    the MP law on [(1 - sqrt(ratio))^2, (1 + sqrt(ratio))^2] with mean 1.
    """
    lo, hi = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    lam = lo + (hi - lo) * (np.arange(grid) + 0.5) / grid  # midpoints: the square case has 1/sqrt(lam) at 0
    density = np.sqrt(np.clip((hi - lam) * (lam - lo), 0, None)) / (2 * math.pi * ratio * lam)
    cdf = np.cumsum(density)
    cdf /= cdf[-1]
    mass = np.cumsum(density * lam)
    mass /= mass[-1]
    cut = np.searchsorted(cdf, 1 - top_fraction)
    return float(1 - mass[cut])


@dataclass(frozen=True)
class MatrixStats:
    """Everything DESIGN §3 asks of one layer (before rank fitting)."""

    rows: int
    rows_excluded: int
    nonfinite_rows: int
    norm_rel_mean: float
    norm_rel_std: float
    dir_mean: float
    dir_std: float
    angle_mean_deg: float
    angle_max_deg: float
    one_minus_cos_mean: float
    rel_delta: float
    rotation_explained: float
    theta_rank_90: int
    theta_energy_30: float
    theta_energy_30_random: float
    resid_rank_90: int
    resid_energy_30: float
    resid_energy_30_random: float
    odd_column: bool
    theta_energy: np.ndarray
    resid_energy: np.ndarray


def _mean_std(x: Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(unbiased=False))


def matrix_stats(teacher: Tensor, student: Tensor, spectra: bool = True) -> MatrixStats:
    """All per-layer statistics of one aligned pair.

    Args:
        teacher: weight with ndim >= 2 (any float dtype, any device).
        student: same shape.
        spectra: False computes the row statistics and rel_delta only (stats-only mode).
    """
    wt, ws = as_matrix(teacher), as_matrix(student)
    # Rows holding NaN/Inf are zeroed in both so that they drop out as excluded rows.
    bad = ~(torch.isfinite(wt).all(dim=1) & torch.isfinite(ws).all(dim=1))
    nonfinite_rows = int(bad.sum())
    if nonfinite_rows:
        wt = wt.masked_fill(bad.unsqueeze(1), 0.0)
        ws = ws.masked_fill(bad.unsqueeze(1), 0.0)
    rc = row_change(wt, ws)
    nr_mean, nr_std = _mean_std(rc.norm_rel)
    d_mean, d_std = _mean_std(rc.dir)
    norm_t = torch.linalg.vector_norm(wt, dtype=torch.float64)
    delta = torch.linalg.vector_norm(ws - wt, dtype=torch.float64)
    rel_delta = float(delta / norm_t) if norm_t > 0 else math.nan
    out, width = wt.shape
    pairs = width // 2
    nan_spec = SpectrumStats(0, math.nan)
    theta_spec = resid_spec = nan_spec
    theta_e = resid_e = np.zeros(0)
    rot = theta_rand = resid_rand = math.nan
    if spectra:
        if pairs > 0:
            theta = implied_angles(wt, ws)
            rot = rotation_explained(wt, ws, theta)
            theta_e = energies(theta).cpu().numpy()
            theta_spec = spectrum_stats(theta_e, (out, pairs))
            theta_rand = random_energy_30(out, pairs)
        resid_e = energies(rc.unit_student - rc.unit_teacher).cpu().numpy()
        resid_spec = spectrum_stats(resid_e, (out, width))
        resid_rand = random_energy_30(out, width)
    return MatrixStats(
        rows=out,
        rows_excluded=rc.excluded,
        nonfinite_rows=nonfinite_rows,
        norm_rel_mean=nr_mean,
        norm_rel_std=nr_std,
        dir_mean=d_mean,
        dir_std=d_std,
        angle_mean_deg=_mean_std(rc.angle_deg)[0],
        angle_max_deg=float(rc.angle_deg.max()) if rc.angle_deg.numel() else math.nan,
        one_minus_cos_mean=_mean_std(rc.one_minus_cos)[0],
        rel_delta=rel_delta,
        rotation_explained=rot,
        theta_rank_90=theta_spec.rank_90,
        theta_energy_30=theta_spec.energy_30,
        theta_energy_30_random=theta_rand,
        resid_rank_90=resid_spec.rank_90,
        resid_energy_30=resid_spec.energy_30,
        resid_energy_30_random=resid_rand,
        odd_column=bool(width % 2),
        theta_energy=theta_e,
        resid_energy=resid_e,
    )
