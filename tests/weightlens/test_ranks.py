"""Rank fitting against hand-computed and brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from weightlens.errors import OptionError
from weightlens.ranks import RankOptions, fit_ranks, parse_budget
from weightlens.results import LayerStats


def layer(name: str, out: int, inp: int, kind: str = "linear") -> LayerStats:
    nan = float("nan")
    return LayerStats(
        name=f"{name}.weight", kind=kind, shape=f"{out}x{inp}", params=out * inp, rows=out,
        norm_rel_mean=nan, norm_rel_std=nan, dir_mean=nan, dir_std=nan, angle_mean_deg=nan,
        angle_max_deg=nan, one_minus_cos_mean=nan, rel_delta=nan, rotation_explained=nan,
        theta_rank_90=0, theta_energy_30=nan, resid_rank_90=0, resid_energy_30=nan, lorad_rank=0,
        block="b", depth=0, rows_excluded=0, nonfinite_rows=0, theta_energy_30_random=nan,
        resid_energy_30_random=nan, odd_column=inp % 2 == 1, teacher_dtype="float32", student_dtype="float32",
    )


LAYERS = [layer("a", 8, 16), layer("b", 16, 8), layer("c", 4, 12), layer("conv", 8, 16, "conv"), layer("odd", 8, 9)]
SPECTRA = {
    "a.weight": np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]),
    "b.weight": np.array([3.0, 3.0, 3.0, 1.0]),
    "c.weight": np.array([10.0, 0.1, 0.01, 0.001]),
    "conv.weight": np.array([5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    "odd.weight": np.array([1.0, 1.0, 1.0, 1.0]),
}


def test_energy_target_picks_smallest_rank_per_layer() -> None:
    cfg = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.9), backbone_params=1000)
    # a: cumulative 8,12,14,15 of 15.94 -> 0.878 at 3, 0.941 at 4; b: 3,6,9 of 10 -> 0.9 at 3; c: 1
    assert cfg.rank_pattern == {"a": 4, "b": 3, "c": 1}  # conv needs include_conv, odd width never
    assert cfg.trainable_params == 4 * (8 + 8) + 3 * (16 + 4) + 1 * (4 + 6)
    with_conv = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.9, include_conv=True), 1000)
    assert with_conv.rank_pattern["conv"] == 7  # 15/16 = 0.9375 at 7


def test_multiple_of_and_bounds() -> None:
    cfg = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.9, multiple_of=2, min_rank=2, max_rank=3), 1000)
    # a needs 4, b 3 (-> 4), c 1 (-> 2); max_rank 3 then allows only the even rank 2
    assert cfg.rank_pattern == {"a": 2, "b": 2, "c": 2}
    loose = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.9, multiple_of=2), 1000)
    assert loose.rank_pattern == {"a": 4, "b": 4, "c": 2}


def _brute_force(budget: int) -> float:
    """Best total Theta energy reachable within the budget, over every rank combination."""
    names = ["a.weight", "b.weight", "c.weight"]
    cost = {"a.weight": 16, "b.weight": 20, "c.weight": 10}
    full = {"a.weight": 8, "b.weight": 4, "c.weight": 4}
    best = 0.0
    for ranks in itertools.product(*(range(full[n] + 1) for n in names)):
        if sum(r * cost[n] for r, n in zip(ranks, names)) <= budget:
            best = max(best, sum(SPECTRA[n][:r].sum() for r, n in zip(ranks, names)))
    return best


@pytest.mark.parametrize("budget", [10, 36, 60, 100, 150, 400])
def test_budget_greedy_is_optimal_on_concave_spectra(budget: int) -> None:
    cfg = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=None, budget=budget), 1000)
    assert cfg.trainable_params <= budget
    got = sum(SPECTRA[f"{n}.weight"][:r].sum() for n, r in cfg.rank_pattern.items())
    assert got == pytest.approx(_brute_force(budget), rel=0.15)  # greedy on a knapsack: near-optimal


def test_budget_and_energy_together_cap_each_layer() -> None:
    cfg = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.5, budget=10_000), 1000)
    assert cfg.rank_pattern == {"a": 1, "b": 2, "c": 1}


def test_lora_pattern_matches_parameter_count() -> None:
    cfg = fit_ranks(LAYERS, SPECTRA, RankOptions(energy=0.9), 1000)
    assert set(cfg.lora_rank_pattern) == set(cfg.rank_pattern)
    assert cfg.lora_params == pytest.approx(cfg.trainable_params, rel=0.35)
    doc = cfg.to_json({"x": 1})
    assert doc["peft_lora"]["trainable_params"] == cfg.lora_params and doc["default_rank"] in cfg.rank_pattern.values()


@pytest.mark.parametrize("text,expected", [("10%", 100), ("0.1", 100), ("5M", 5_000_000), ("2e3", 2000), ("1200", 1200), ("83.8M", 83_800_000), (None, None)])
def test_parse_budget(text: str | None, expected: int | None) -> None:
    assert parse_budget(text, 1000) == expected


@pytest.mark.parametrize("text", ["ten", "5X", "%"])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(OptionError):
        parse_budget(text, 1000)


def test_min_rank_over_budget_is_a_clear_error() -> None:
    with pytest.raises(OptionError, match="min-rank"):
        fit_ranks(LAYERS, SPECTRA, RankOptions(energy=None, budget=20, min_rank=2), 1000)
