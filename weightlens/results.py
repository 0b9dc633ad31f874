"""Typed results of an analysis: what renderers and writers take, never recompute.

`Analysis` holds the per-layer table, the 1-D tensor table, pooled summary, alignment
report, alerts, spectra and provenance; `.layers.to_pandas()` gives the layer table as a
DataFrame with the `layers.csv` columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["LayerStats", "VectorStats", "LayerTable", "Alert", "Summary", "Analysis", "LAYER_COLUMNS"]

# The layers.csv contract (DESIGN §4), in order, followed by extra columns.
LAYER_COLUMNS = (
    "name", "kind", "shape", "params", "rows", "norm_rel_mean", "norm_rel_std", "dir_mean",
    "dir_std", "angle_mean_deg", "angle_max_deg", "one_minus_cos_mean", "rel_delta",
    "rotation_explained", "theta_rank_90", "theta_energy_30", "resid_rank_90", "resid_energy_30",
    "lorad_rank",
)


@dataclass(frozen=True)
class LayerStats:
    """One aligned matrix layer. Fractions, not percent."""

    name: str
    kind: str
    shape: str
    params: int
    rows: int
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
    resid_rank_90: int
    resid_energy_30: float
    lorad_rank: int
    block: str
    depth: int
    rows_excluded: int
    nonfinite_rows: int
    theta_energy_30_random: float
    resid_energy_30_random: float
    odd_column: bool
    teacher_dtype: str
    student_dtype: str

    @property
    def out_features(self) -> int:
        return self.rows

    @property
    def in_features(self) -> int:
        return self.params // self.rows if self.rows else 0

    @property
    def lorad_unit_cost(self) -> int:
        """Parameters of one LoRaD rank unit: out + in/2."""
        return self.rows + self.in_features // 2


@dataclass(frozen=True)
class VectorStats:
    """One aligned 1-D tensor (bias, norm scale)."""

    name: str
    shape: str
    numel: int
    rel_delta: float
    max_abs_diff: float
    cosine: float


class LayerTable(Sequence[LayerStats]):
    """An ordered, immutable table of LayerStats with `.to_pandas()`."""

    def __init__(self, rows: Sequence[LayerStats]):
        self._rows = tuple(rows)

    def __getitem__(self, index):  # type: ignore[override]
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self._rows)

    def by_name(self, name: str) -> LayerStats:
        for row in self._rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_pandas(self) -> Any:
        import pandas as pd

        cols = list(LAYER_COLUMNS) + [f.name for f in fields(LayerStats) if f.name not in LAYER_COLUMNS]
        return pd.DataFrame([asdict(r) for r in self._rows], columns=cols)


@dataclass(frozen=True)
class Alert:
    """A recoverable oddity: logged as a warning and shown in the report."""

    level: str  # "warning" | "info"
    code: str
    message: str


@dataclass(frozen=True)
class Summary:
    """All-layer figures pooled over every row of every layer."""

    layers: int
    params_compared: int
    norm_rel_mean: float
    norm_rel_std: float
    dir_mean: float
    dir_std: float
    dir_to_norm_ratio: float
    rotation_explained_mean: float
    theta_energy_30_mean: float
    theta_energy_30_random_mean: float
    resid_energy_30_mean: float
    resid_energy_30_random_mean: float

    @staticmethod
    def pool(rows: Sequence[LayerStats]) -> "Summary":
        """Pool per-layer means/stds exactly: weights are each layer's counted rows."""
        counted = [(r.rows - r.rows_excluded, r) for r in rows if r.rows - r.rows_excluded > 0 and not math.isnan(r.dir_mean)]
        n = sum(c for c, _ in counted)

        def pooled(mean_attr: str, std_attr: str) -> tuple[float, float]:
            if n == 0:
                return math.nan, math.nan
            mu = sum(c * getattr(r, mean_attr) for c, r in counted) / n
            second = sum(c * (getattr(r, std_attr) ** 2 + getattr(r, mean_attr) ** 2) for c, r in counted) / n
            return mu, math.sqrt(max(second - mu * mu, 0.0))

        def mean(attr: str) -> float:
            vals = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
            return float(np.mean(vals)) if vals else math.nan

        nr_mu, nr_sd = pooled("norm_rel_mean", "norm_rel_std")
        d_mu, d_sd = pooled("dir_mean", "dir_std")
        return Summary(
            layers=len(rows),
            params_compared=sum(r.params for r in rows),
            norm_rel_mean=nr_mu,
            norm_rel_std=nr_sd,
            dir_mean=d_mu,
            dir_std=d_sd,
            dir_to_norm_ratio=d_mu / nr_mu if nr_mu > 0 else math.inf if d_mu > 0 else math.nan,
            rotation_explained_mean=mean("rotation_explained"),
            theta_energy_30_mean=mean("theta_energy_30"),
            theta_energy_30_random_mean=mean("theta_energy_30_random"),
            resid_energy_30_mean=mean("resid_energy_30"),
            resid_energy_30_random_mean=mean("resid_energy_30_random"),
        )


@dataclass(frozen=True)
class Analysis:
    """Everything `compare` found; writers and renderers take only this."""

    layers: LayerTable
    vectors: tuple[VectorStats, ...]
    summary: Summary
    only_in_teacher: tuple[str, ...]
    only_in_student: tuple[str, ...]
    shape_mismatch: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    alerts: tuple[Alert, ...]
    provenance: dict[str, Any]
    theta_spectra: dict[str, np.ndarray] = field(default_factory=dict)
    resid_spectra: dict[str, np.ndarray] = field(default_factory=dict)
    ranks: Any = None  # weightlens.ranks.RankConfig, set by compare
    backbone_params: int = 0
