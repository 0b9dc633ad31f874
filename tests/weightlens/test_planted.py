"""Planted ground truth: weightlens reads back exactly what was planted."""

from __future__ import annotations

import numpy as np
import pytest
from planted_pair import RANK, ROTATED, SCALED
from safetensors.torch import save_file

import weightlens
from weightlens.ranks import module_name


@pytest.fixture(scope="module")
def analysis(unet_pair, tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("planted")
    save_file(unet_pair.teacher, d / "t.safetensors")
    save_file(unet_pair.student, d / "s.safetensors")
    return weightlens.compare(d / "t.safetensors", d / "s.safetensors", weightlens.CompareOptions(energy=0.99, timestamps=False))


@pytest.mark.parametrize("name", ROTATED)
def test_rotated_layers(analysis, name: str) -> None:  # type: ignore[no-untyped-def]
    row = analysis.layers.by_name(name)
    assert row.norm_rel_mean < 1e-6
    assert row.rotation_explained == pytest.approx(1.0, abs=1e-6)
    assert row.dir_mean > 1e-3
    e = analysis.theta_spectra[name]
    assert e[RANK:].sum() / e.sum() < 1e-6  # Theta has rank RANK (float32 round-off beyond)
    assert row.theta_rank_90 == RANK  # equal singular values: 90 % needs all RANK
    assert analysis.ranks.rank_pattern[module_name(name)] == RANK
    assert row.lorad_rank == RANK


@pytest.mark.parametrize("name,scale", sorted(SCALED.items()))
def test_scaled_layers(analysis, name: str, scale: float) -> None:  # type: ignore[no-untyped-def]
    row = analysis.layers.by_name(name)
    assert row.dir_mean < 1e-6
    assert row.norm_rel_mean == pytest.approx(abs(scale - 1), rel=1e-5)
    assert row.norm_rel_std < 1e-6


def test_noisy_layers_are_not_rotations(analysis) -> None:  # type: ignore[no-untyped-def]
    noisy = [r for r in analysis.layers if r.name not in ROTATED and r.name not in SCALED]
    assert noisy and all(r.rotation_explained < 0.9 for r in noisy)
    # additive noise is not a rotation: most of its change is left unexplained by Theta
    assert np.mean([r.rotation_explained for r in noisy]) < 0.7


def test_table_and_summary(analysis, unet_pair) -> None:  # type: ignore[no-untyped-def]
    df = analysis.layers.to_pandas()
    matrices = [k for k, v in unet_pair.teacher.items() if v.ndim >= 2]
    assert sorted(df["name"]) == sorted(matrices)
    assert list(df.columns[:19]) == list(weightlens.results.LAYER_COLUMNS)
    assert len(analysis.vectors) == len(unet_pair.teacher) - len(matrices)
    pooled = np.concatenate([np.full(r.rows, r.dir_mean) for r in analysis.layers])
    assert analysis.summary.dir_mean == pytest.approx(pooled.mean())
    assert analysis.backbone_params == sum(v.numel() for v in unet_pair.teacher.values())
