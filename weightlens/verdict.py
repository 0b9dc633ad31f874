"""What a report leads with: the verdict, per-block aggregates and the other derived views.

Renderers never compute, so every figure the HTML page or the PNGs show that is not a raw
field of :class:`~weightlens.results.Analysis` comes from a pure function here: the verdict
(is distillation direction- or norm-dominated, by how much, where, how low-rank), the block
table, the rank table, cumulative spectrum curves against a random baseline, and the
deterministic number formatting every renderer shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from weightlens.blocks import block_of, depth_key
from weightlens.ranks import module_name
from weightlens.results import Analysis, LayerStats

__all__ = [
    "DIRECTION_DOMINATED",
    "NORM_DOMINATED",
    "MIXED",
    "UNCHANGED",
    "UNDETERMINED",
    "BlockChange",
    "RankHeadline",
    "Verdict",
    "BlockRow",
    "RankRow",
    "SpectrumCurve",
    "verdict",
    "block_table",
    "rank_table",
    "spectrum_curves",
    "format_pct",
    "format_num",
    "format_int",
    "format_ratio",
]

DIRECTION_DOMINATED = "direction-dominated"
NORM_DOMINATED = "norm-dominated"
MIXED = "mixed"
UNCHANGED = "unchanged"
UNDETERMINED = "undetermined"

# dir/norm ratio at or above DOMINANCE is direction-dominated, at or below 1/DOMINANCE
# norm-dominated. The WaDi paper reads ~22x on SD1.5 -> DMD2 (arXiv 2603.08258, Fig. 1a).
DOMINANCE = 3.0
# Theta energy in the top 30 % of ranks above the random baseline by at least this much
# (absolute share) counts as concentrated / mildly concentrated.
CONCENTRATED_LIFT = 0.10
MILD_LIFT = 0.03
TOP_BLOCKS = 3


@dataclass(frozen=True)
class BlockChange:
    """A block and its params-weighted mean relative change ||dW||_F / ||W||_F."""

    block: str
    rel_delta: float


@dataclass(frozen=True)
class RankHeadline:
    """The fitted LoRaD rank config in one line."""

    target_modules: int
    trainable_params: int
    backbone_params: int
    trainable_fraction: float  # of backbone_params; NaN when unknown
    default_rank: int
    energy_captured: float  # mean Theta energy share captured over target modules
    energy_target: float | None
    budget_params: int | None


@dataclass(frozen=True)
class Verdict:
    """What the report leads with. Fractions, not percent.

    Attributes:
        kind: direction-dominated, norm-dominated, mixed, unchanged or undetermined.
        ratio: pooled dir mean / pooled norm_rel mean (DESIGN §3 `dir_to_norm_ratio`).
        dir_mean / norm_rel_mean: the pooled means the ratio is made of.
        rotation_explained: mean over changed layers of the share a pure LoRaD rotation explains.
        theta_energy_30 / theta_energy_30_random: mean Theta energy in the top 30 % of ranks
            and the random-matrix baseline, over the same layers (those with a Theta spectrum).
        resid_energy_30 / resid_energy_30_random: the same for the direction residual.
        concentration: concentrated, mildly concentrated, like random, or unknown.
        top_blocks: up to three blocks with the largest params-weighted mean rel_delta.
        layers / changed_layers: aligned matrix layers and those with any change.
        has_spectra: some layer has rotation/spectrum figures (False in stats-only mode).
        ranks: the rank config headline, None without fitted ranks.
        headline: one sentence.
    """

    kind: str
    ratio: float
    dir_mean: float
    norm_rel_mean: float
    rotation_explained: float
    theta_energy_30: float
    theta_energy_30_random: float
    resid_energy_30: float
    resid_energy_30_random: float
    concentration: str
    top_blocks: tuple[BlockChange, ...]
    layers: int
    changed_layers: int
    has_spectra: bool
    ranks: RankHeadline | None
    headline: str


@dataclass(frozen=True)
class BlockRow:
    """Per-block aggregates: params-weighted means over the block's matrix layers."""

    block: str
    depth: int
    layers: int
    params: int
    norm_rel_mean: float
    dir_mean: float
    rel_delta: float
    rotation_explained: float
    lorad_params: int


@dataclass(frozen=True)
class RankRow:
    """One LoRaD target module."""

    module: str
    block: str
    depth: int
    shape: str
    rank: int
    params: int
    energy_captured: float


@dataclass(frozen=True)
class SpectrumCurve:
    """Cumulative Theta energy share vs rank fraction, for a layer and a random matrix."""

    name: str
    rank_fraction: tuple[float, ...]
    cumulative: tuple[float, ...]
    random_rank_fraction: tuple[float, ...]
    random_cumulative: tuple[float, ...]


# ----------------------------------------------------------------------------- formatting


def _bad(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fixed(value: float, sig: int) -> str:
    """`value` with `sig` significant digits in fixed notation (scientific when tiny)."""
    if value == 0:
        return "0"
    value = float(f"{value:.{sig - 1}e}")  # round first so that 99.96 reads 100, not 100.0
    mag = math.floor(math.log10(abs(value)))
    if mag < -4:
        return f"{value:.{sig - 1}e}"
    decimals = max(0, sig - 1 - mag)
    return f"{value:.{decimals}f}"


def format_pct(value: float | None, sig: int = 3) -> str:
    """A fraction as a percentage with `sig` significant digits: 0.0221 -> `2.21%`."""
    if _bad(value):
        return "–"
    assert value is not None
    if math.isinf(value):
        return "∞%" if value > 0 else "-∞%"
    return f"{_fixed(value * 100, sig)}%"


def format_num(value: float | None, sig: int = 3) -> str:
    """A float with `sig` significant digits; thousands separators from 1000 up."""
    if _bad(value):
        return "–"
    assert value is not None
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if abs(value) >= 999.5:
        return f"{value:,.0f}"
    return _fixed(float(value), sig)


def format_int(value: int | float | None) -> str:
    """An integer with thousands separators: 83800000 -> `83,800,000`."""
    if _bad(value):
        return "–"
    assert value is not None
    return f"{int(value):,}"


def format_ratio(value: float | None) -> str:
    """A ratio with two significant digits: 22.41 -> `22×`, 0.937 -> `0.94×`."""
    if _bad(value):
        return "–"
    assert value is not None
    if math.isinf(value):
        return "∞×"
    if abs(value) >= 100:
        return f"{round(value):,}×"
    return f"{_fixed(value, 2)}×"


# ----------------------------------------------------------------------------- aggregates


def _weighted_mean(pairs: Iterable[tuple[float, float]]) -> float:
    """Weighted mean of (weight, value), NaN values left out; NaN when none are left."""
    total = acc = 0.0
    for w, v in pairs:
        if not math.isnan(v) and w > 0:
            total += w
            acc += w * v
    return acc / total if total > 0 else math.nan


def _finite_mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _lorad_params(layer: LayerStats) -> int:
    return layer.lorad_rank * layer.lorad_unit_cost


def block_table(analysis: Analysis) -> list[BlockRow]:
    """Per-block aggregates in depth (forward) order.

    Means are weighted by each layer's parameter count; NaN fields (unchanged layers have no
    rotation_explained) drop out of their mean.
    """
    groups: dict[str, list[LayerStats]] = {}
    for layer in analysis.layers:
        groups.setdefault(layer.block, []).append(layer)
    rows = []
    for block, layers in groups.items():
        def wmean(attr: str, layers: list[LayerStats] = layers) -> float:
            return _weighted_mean((l.params, getattr(l, attr)) for l in layers)

        rows.append(BlockRow(
            block=block,
            depth=min(l.depth for l in layers),
            layers=len(layers),
            params=sum(l.params for l in layers),
            norm_rel_mean=wmean("norm_rel_mean"),
            dir_mean=wmean("dir_mean"),
            rel_delta=wmean("rel_delta"),
            rotation_explained=wmean("rotation_explained"),
            lorad_params=sum(_lorad_params(l) for l in layers),
        ))
    rows.sort(key=lambda r: (r.depth, depth_key(r.block)))
    return rows


def rank_table(analysis: Analysis) -> list[RankRow]:
    """One row per LoRaD target module in depth order; empty without fitted ranks."""
    ranks = analysis.ranks
    if ranks is None:
        return []
    by_module = {module_name(l.name): l for l in analysis.layers}  # rank_pattern keys are module paths
    rows = []
    for module, rank in ranks.rank_pattern.items():
        layer = by_module.get(module)
        block = layer.block if layer is not None else block_of(module)
        rows.append(RankRow(
            module=module,
            block=block,
            depth=layer.depth if layer is not None else -1,
            shape=layer.shape if layer is not None else "",
            rank=rank,
            params=rank * layer.lorad_unit_cost if layer is not None else 0,
            energy_captured=ranks.captured.get(module, math.nan),
        ))
    rows.sort(key=lambda r: (r.depth, depth_key(r.block), r.module))
    return rows


def _rank_headline(analysis: Analysis) -> RankHeadline | None:
    ranks = analysis.ranks
    if ranks is None:
        return None
    backbone = ranks.backbone_params or analysis.backbone_params
    return RankHeadline(
        target_modules=len(ranks.rank_pattern),
        trainable_params=ranks.trainable_params,
        backbone_params=backbone,
        trainable_fraction=ranks.trainable_params / backbone if backbone else math.nan,
        default_rank=ranks.default_rank,
        energy_captured=_finite_mean(ranks.captured.values()),
        energy_target=ranks.options.energy,
        budget_params=ranks.options.budget,
    )


def _top_blocks(table: Sequence[BlockRow]) -> tuple[BlockChange, ...]:
    changed = [r for r in table if not math.isnan(r.rel_delta) and r.rel_delta > 0]
    changed.sort(key=lambda r: (-r.rel_delta, r.depth, r.block))
    return tuple(BlockChange(r.block, r.rel_delta) for r in changed[:TOP_BLOCKS])


def _kind(ratio: float, dir_mean: float, norm_mean: float, changed: int) -> str:
    if changed == 0 or (dir_mean == 0 and norm_mean == 0):
        return UNCHANGED
    if math.isnan(ratio):
        return UNDETERMINED
    # Relative slack: a ratio of exactly 3 (or 1/3) must classify the same after float rounding.
    if ratio >= DOMINANCE * (1 - 1e-9):
        return DIRECTION_DOMINATED
    if ratio <= (1 + 1e-9) / DOMINANCE:
        return NORM_DOMINATED
    return MIXED


def _concentration(observed: float, random: float) -> str:
    if math.isnan(observed) or math.isnan(random):
        return "unknown"
    lift = observed - random
    if lift >= CONCENTRATED_LIFT:
        return "concentrated"
    if lift >= MILD_LIFT:
        return "mildly concentrated"
    return "like random"


def _paired_means(layers: Sequence[LayerStats], attr: str) -> tuple[float, float]:
    """Mean of `attr` and of its random baseline over layers where both are known."""
    pairs = [(getattr(l, attr), getattr(l, f"{attr}_random")) for l in layers]
    pairs = [(o, r) for o, r in pairs if not math.isnan(o) and not math.isnan(r)]
    if not pairs:
        return math.nan, math.nan
    return float(np.mean([o for o, _ in pairs])), float(np.mean([r for _, r in pairs]))


def _join(names: Sequence[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _headline(
    kind: str, ratio: float, dir_mean: float, norm_mean: float, top: Sequence[BlockChange], layers: int
) -> str:
    where = f", most in {_join([b.block for b in top])}" if top else ""
    if kind == UNCHANGED:
        if not layers:
            return "No layers could be compared."
        return f"The student is identical to the teacher in all {layers} aligned layers."
    if kind == UNDETERMINED:
        return "Weights changed, but no row statistics could be computed (every row was excluded)."
    means = f"({format_pct(dir_mean)} vs {format_pct(norm_mean)})"
    if kind == DIRECTION_DOMINATED:
        return (f"Distillation mostly rotated the weights: direction change is {format_ratio(ratio)} "
                f"the norm change {means}{where}.")
    if kind == NORM_DOMINATED:
        inverse = norm_mean / dir_mean if dir_mean > 0 else math.inf
        return (f"Distillation mostly rescaled the weights: norm change is {format_ratio(inverse)} "
                f"the direction change {means}{where}.")
    return (f"Distillation changed norms and directions alike: direction change is {format_ratio(ratio)} "
            f"the norm change {means}{where}.")


def verdict(analysis: Analysis) -> Verdict:
    """The report's lead: direction- vs norm-dominated, by how much, where, how low-rank.

    Args:
        analysis: a finished analysis.

    Returns:
        A :class:`Verdict`; NaN fields where the analysis has no such figure (stats-only mode,
        an unchanged student).
    """
    s = analysis.summary
    layers = list(analysis.layers)
    changed = sum(1 for l in layers if not math.isnan(l.rel_delta) and l.rel_delta > 0)
    top = _top_blocks(block_table(analysis))
    kind = _kind(s.dir_to_norm_ratio, s.dir_mean, s.norm_rel_mean, changed)
    theta_obs, theta_rand = _paired_means(layers, "theta_energy_30")
    resid_obs, resid_rand = _paired_means(layers, "resid_energy_30")
    return Verdict(
        kind=kind,
        ratio=s.dir_to_norm_ratio,
        dir_mean=s.dir_mean,
        norm_rel_mean=s.norm_rel_mean,
        rotation_explained=s.rotation_explained_mean,
        theta_energy_30=theta_obs,
        theta_energy_30_random=theta_rand,
        resid_energy_30=resid_obs,
        resid_energy_30_random=resid_rand,
        concentration=_concentration(theta_obs, theta_rand),
        top_blocks=top,
        layers=len(layers),
        changed_layers=changed,
        has_spectra=not (math.isnan(theta_obs) and math.isnan(resid_obs)),
        ranks=_rank_headline(analysis),
        headline=_headline(kind, s.dir_to_norm_ratio, s.dir_mean, s.norm_rel_mean, top, len(layers)),
    )


# ----------------------------------------------------------------------------- spectra


def _cumulative(energy: np.ndarray) -> tuple[float, ...]:
    e = np.asarray(energy, dtype=np.float64)
    return tuple(float(v) for v in np.cumsum(e) / e.sum())


def _fractions(n: int) -> tuple[float, ...]:
    return tuple((k + 1) / n for k in range(n))


def _random_energy(rows: int, cols: int) -> np.ndarray:
    """Squared singular values of the seeded Gaussian matrix behind `random_energy_30`."""
    import torch

    from weightlens.stats import energies

    gen = torch.Generator().manual_seed(rows * 1_000_003 + cols)  # same seed as stats.random_energy_30
    return energies(torch.randn(rows, cols, generator=gen)).numpy()


def spectrum_curves(
    analysis: Analysis, count: int = 4, random_energy: Callable[[int, int], np.ndarray] = _random_energy
) -> list[SpectrumCurve]:
    """Cumulative Theta energy curves of the `count` most changed layers, in depth order.

    Only layers with a non-zero Theta spectrum qualify (a pure norm scaling has Theta = 0).
    Each curve comes with the same curve of a seeded Gaussian matrix of Theta's shape, the
    null baseline behind `theta_energy_30_random`.
    """
    candidates = []
    for layer in analysis.layers:
        energy = analysis.theta_spectra.get(layer.name)
        if energy is None or len(energy) == 0 or not float(np.sum(energy)) > 0 or math.isnan(layer.rel_delta):
            continue
        candidates.append((layer, energy))
    candidates.sort(key=lambda le: (-le[0].rel_delta, le[0].name))
    chosen = sorted(candidates[:count], key=lambda le: (le[0].depth, le[0].name))
    curves = []
    for layer, energy in chosen:
        rand = random_energy(layer.rows, layer.in_features // 2)
        curves.append(SpectrumCurve(
            layer.name, _fractions(len(energy)), _cumulative(energy), _fractions(len(rand)), _cumulative(rand)
        ))
    return curves
