"""Fréchet distance between Gaussian fits of feature sets (FID, Heusel et al. 2017, eq. 6).

Statistics are a typed record (`FeatureStats`: mean, covariance, count) so that reference
statistics can be computed once and stored (`save_stats` / `load_stats`, an `.npz`). The
distance avoids `scipy.linalg.sqrtm` of the non-symmetric product `S1 @ S2`, which is slow and
can return complex noise: since `S1 S2` is similar to the symmetric PSD matrix
`sqrt(S1) S2 sqrt(S1)`, the two share eigenvalues, so `tr sqrtm(S1 S2)` is the sum of the
square roots of the eigenvalues of that symmetric matrix. Both square roots come from
`np.linalg.eigh` in float64, with round-off negative eigenvalues clamped to 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wadi_train.evaluation.errors import EvaluationError

__all__ = ["FeatureStats", "feature_stats", "frechet_distance", "fid", "save_stats", "load_stats"]

log = logging.getLogger(__name__)

# Eigenvalues below -_NEG_TOL * max|eigenvalue| are not round-off: the matrix is not PSD.
_NEG_TOL = 1e-6


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set.

    Attributes:
        mu: mean, shape (D,), float64.
        sigma: unbiased covariance (ddof=1), shape (D, D), float64.
        n: number of feature vectors the fit was computed from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        mu, sigma = np.asarray(self.mu), np.asarray(self.sigma)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise EvaluationError(
                f"FeatureStats needs mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}"
            )
        if self.n < 2:
            raise EvaluationError(f"FeatureStats needs n >= 2 feature vectors, got n={self.n}")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.mu.shape[0])


def _as_float64(features: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(features, Tensor):
        return features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """Mean and unbiased covariance of a feature matrix, in float64.

    Args:
        features: shape (N, D), N >= 2; a NumPy array or a tensor on any device.

    Returns:
        The `FeatureStats` of the N rows.

    Raises:
        EvaluationError: the input is not 2-D, has fewer than 2 rows, or is not finite.
    """
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise EvaluationError(f"features must have shape (N, D) with N >= 2, got {x.shape}")
    if not np.isfinite(x).all():
        raise EvaluationError("features contain NaN or inf; check the model that produced them")
    mu = x.mean(axis=0)
    centred = x - mu  # (N, D)
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return FeatureStats(mu=mu, sigma=(sigma + sigma.T) / 2, n=int(x.shape[0]))


def _psd_eigvalsh(m: np.ndarray, what: str) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, round-off negatives clamped to 0."""
    w = np.linalg.eigvalsh((m + m.T) / 2)
    _check_psd(w, what)
    return np.clip(w, 0.0, None)


def _check_psd(w: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    if w.min(initial=0.0) < -_NEG_TOL * scale:
        raise EvaluationError(
            f"{what} is not positive semi-definite (eigenvalue {w.min():.3g}, largest "
            f"{scale:.3g}); pass covariances from feature_stats"
        )


def _psd_sqrt(m: np.ndarray, what: str) -> np.ndarray:
    """Symmetric square root V diag(sqrt(w)) V^T of a symmetric PSD matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    _check_psd(w, what)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians N(mu_a, S_a) and N(mu_b, S_b).

    d^2 = |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrtm(sqrt(S_a) S_b sqrt(S_a)),
    the symmetric form of the usual tr sqrtm(S_a S_b) (same eigenvalues).

    Args:
        a: statistics of one feature set.
        b: statistics of the other, same feature dimension.

    Returns:
        The squared Fréchet distance (FID when the features are Inception's), >= 0.

    Raises:
        EvaluationError: the dimensions differ or a covariance is not PSD.
    """
    if a.dim != b.dim:
        raise EvaluationError(
            f"feature dimensions differ: {a.dim} vs {b.dim}; use one feature extractor"
        )
    s1 = np.asarray(a.sigma, dtype=np.float64)
    s2 = np.asarray(b.sigma, dtype=np.float64)
    diff = np.asarray(a.mu, dtype=np.float64) - np.asarray(b.mu, dtype=np.float64)
    root1 = _psd_sqrt(s1, "covariance a")
    cross = _psd_eigvalsh(root1 @ s2 @ root1, "sqrt(S_a) S_b sqrt(S_a)")
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(cross).sum())
    # Round-off can leave identical statistics at -1e-13; the true distance is >= 0.
    return max(value, 0.0)


def fid(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two (N, D) feature matrices."""
    return frechet_distance(feature_stats(feats_a), feature_stats(feats_b))


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write statistics to an uncompressed `.npz` (keys mu, sigma, n); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as fh:  # a file handle stops NumPy from appending a second ".npz"
        np.savez(
            fh,
            mu=np.asarray(stats.mu, np.float64),
            sigma=np.asarray(stats.sigma, np.float64),
            n=np.int64(stats.n),
        )
    log.debug("saved feature statistics (D=%d, n=%d) to %s", stats.dim, stats.n, p)
    return p


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by `save_stats`.

    Raises:
        EvaluationError: the file is missing, unreadable or lacks mu, sigma or n.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = {"mu", "sigma", "n"} - set(data.files)
            if missing:
                raise EvaluationError(f"{p}: not a statistics file, missing {sorted(missing)}")
            mu, sigma, n = data["mu"], data["sigma"], int(data["n"])
    except (OSError, ValueError) as exc:
        raise EvaluationError(
            f"{p}: cannot read feature statistics ({exc}); recompute them"
        ) from None
    return FeatureStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n)
