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

__all__ = [
    "FeatureStats",
    "StatsAccumulator",
    "feature_stats",
    "fid",
    "frechet_distance",
    "load_stats",
    "save_stats",
]

log = logging.getLogger(__name__)

# Eigenvalues below -_NEG_TOL * max|eigenvalue| are not round-off: the matrix is not PSD.
_NEG_TOL = 1e-6


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set.

    Attributes:
        mu: mean, shape (D,), float64.
        sigma: unbiased covariance (ddof=1), shape (D, D), float64.
        n: number of feature vectors the fit was computed from; None when a file from another
            tool (pytorch-fid, torch-fidelity, clean-fid: only mu and sigma) does not say.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None

    def __post_init__(self) -> None:
        mu, sigma = np.asarray(self.mu), np.asarray(self.sigma)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise EvaluationError(
                f"FeatureStats needs mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}"
            )
        if self.n is not None and self.n < 2:
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


class StatsAccumulator:
    """`feature_stats` over batches, without holding every feature vector (e.g. 30K x 2048).

    Sums are float64 and taken around the first batch's mean, which keeps the covariance as
    accurate as the two-pass formula for features with a large common offset.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | Tensor) -> None:
        """Add a batch of feature vectors (B, D); raises EvaluationError for non-finite ones."""
        x = _as_float64(features)
        if x.ndim != 2 or (self._shift is not None and x.shape[1] != self._shift.shape[0]):
            raise EvaluationError(f"features must have shape (B, D) with one D throughout, got {x.shape}")
        if not np.isfinite(x).all():
            raise EvaluationError("features contain NaN or inf; check the model that produced them")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        centred = x - self._shift  # (B, D)
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.n += x.shape[0]

    def stats(self) -> FeatureStats:
        """The `FeatureStats` of everything added so far (needs at least 2 vectors)."""
        if self._shift is None or self.n < 2:
            raise EvaluationError(f"need at least 2 feature vectors for statistics, got {self.n}")
        assert self._sum is not None and self._outer is not None
        mean = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return FeatureStats(mu=self._shift + mean, sigma=(sigma + sigma.T) / 2, n=self.n)


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


def _psd_factor(m: np.ndarray, what: str) -> np.ndarray:
    """F (D, r) with F F^T = m for a symmetric PSD matrix: eigenvectors times sqrt(eigenvalues),
    the numerical null space (eigenvalues below D * eps * the largest, numpy's matrix_rank
    threshold) left out, so r is the rank (< D for fewer feature vectors than dimensions)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    _check_psd(w, what)
    keep = w > m.shape[0] * np.finfo(np.float64).eps * max(float(w.max(initial=0.0)), 0.0)
    return v[:, keep] * np.sqrt(w[keep])  # (D, r)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians N(mu_a, S_a) and N(mu_b, S_b).

    d^2 = |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrtm(sqrt(S_a) S_b sqrt(S_a)),
    the symmetric form of the usual tr sqrtm(S_a S_b) (same eigenvalues). With S_a = F F^T
    (F = V sqrt(W), rank r), S_a S_b = F (F^T S_b) has the non-zero eigenvalues of the r x r
    matrix F^T S_b F, so the second eigensolve is only as large as S_a's rank.

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
    factor = _psd_factor(s1, "covariance a")  # (D, r)
    cross = _psd_eigvalsh(factor.T @ s2 @ factor, "sqrt(S_a) S_b sqrt(S_a)")  # (r,)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(cross).sum())
    # Round-off can leave identical statistics at -1e-13; the true distance is >= 0.
    return max(value, 0.0)


def fid(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two (N, D) feature matrices."""
    return frechet_distance(feature_stats(feats_a), feature_stats(feats_b))


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write statistics to an uncompressed `.npz` (keys mu, sigma, n); returns the path.

    `n` is left out when unknown; pytorch-fid and torch-fidelity read the file as it is.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = np.asarray(stats.mu, np.float64), np.asarray(stats.sigma, np.float64)
    with p.open("wb") as fh:  # a file handle stops NumPy from appending a second ".npz"
        if stats.n is None:
            np.savez(fh, mu=mu, sigma=sigma)
        else:
            np.savez(fh, mu=mu, sigma=sigma, n=np.int64(stats.n))
    log.debug("saved feature statistics (D=%d, n=%d) to %s", stats.dim, stats.n, p)
    return p


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by `save_stats`, or pytorch-fid / torch-fidelity / clean-fid
    `.npz` files (keys mu and sigma; their `n` is then None).

    Raises:
        EvaluationError: the file is missing, unreadable or lacks mu or sigma.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise EvaluationError(f"{p}: not a statistics file, missing {sorted(missing)} (found {sorted(data.files)})")
            mu, sigma = data["mu"], data["sigma"]
            n = int(data["n"]) if "n" in data.files else None
    except (OSError, ValueError) as exc:
        raise EvaluationError(
            f"{p}: cannot read feature statistics ({exc}); recompute them"
        ) from None
    return FeatureStats(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), n=n)
