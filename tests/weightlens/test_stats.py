"""Each statistic against an independent float64 NumPy reference on random matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightlens.rotation import implied_angles, rotate_pairs
from weightlens.stats import energies, matrix_stats, random_energy_30, row_change, spectrum_stats


def np_reference(t: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """DESIGN §3 computed the obvious way in float64."""
    t, s = t.reshape(t.shape[0], -1).astype(np.float64), s.reshape(s.shape[0], -1).astype(np.float64)
    mt, ms = np.linalg.norm(t, axis=1), np.linalg.norm(s, axis=1)
    ok = (mt > 0) & (ms > 0)
    ut, us = t[ok] / mt[ok, None], s[ok] / ms[ok, None]
    cos = np.clip((ut * us).sum(1), -1, 1)
    d = np.linalg.norm(us - ut, axis=1)
    norm_rel = np.abs(ms[ok] - mt[ok]) / mt[ok]
    k = t.shape[1] // 2
    a0, a1, b0, b1 = t[:, 0:2 * k:2], t[:, 1:2 * k:2], s[:, 0:2 * k:2], s[:, 1:2 * k:2]
    theta = np.arctan2(a0 * b1 - a1 * b0, a0 * b0 + a1 * b1)
    rot = t.copy()
    rot[:, 0:2 * k:2] = a0 * np.cos(theta) - a1 * np.sin(theta)
    rot[:, 1:2 * k:2] = a0 * np.sin(theta) + a1 * np.cos(theta)
    re = 1 - np.sum((s - rot) ** 2) / np.sum((s - t) ** 2)
    Ut, Us = np.zeros_like(t), np.zeros_like(s)
    Ut[ok], Us[ok] = ut, us

    def spec(m: np.ndarray) -> tuple[int, float]:
        sv = np.linalg.svd(m, compute_uv=False) ** 2
        cum = np.cumsum(sv) / sv.sum()
        return int(np.argmax(cum >= 0.9 - 1e-12) + 1), float(cum[math.ceil(0.3 * min(m.shape)) - 1])

    tr, te = spec(theta)
    rr, rE = spec(Us - Ut)
    return {
        "norm_rel_mean": norm_rel.mean(), "norm_rel_std": norm_rel.std(), "dir_mean": d.mean(),
        "dir_std": d.std(), "angle_mean_deg": np.degrees(np.arccos(cos)).mean(),
        "angle_max_deg": np.degrees(np.arccos(cos)).max(), "one_minus_cos_mean": (1 - cos).mean(),
        "rel_delta": np.linalg.norm(s - t) / np.linalg.norm(t), "rotation_explained": re,
        "theta_rank_90": tr, "theta_energy_30": te, "resid_rank_90": rr, "resid_energy_30": rE,
    }


SHAPES = [(48, 64), (96, 30), (7, 130), (64, 16, 3, 3), (33, 65)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("change", [0.3, 0.05])
def test_matrix_stats_match_numpy(shape: tuple[int, ...], change: float) -> None:
    rng = np.random.default_rng(sum(shape))
    t = rng.standard_normal(shape).astype(np.float32)
    s = (t * (1 + 0.1 * rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))) + change * rng.standard_normal(shape)).astype(np.float32)
    got = matrix_stats(torch.from_numpy(t), torch.from_numpy(s))
    ref = np_reference(t, s)
    for key, want in ref.items():
        value = getattr(got, key)
        if key.endswith("rank_90"):
            assert abs(value - want) <= 1, (key, value, want)  # a tie at exactly 90 % may flip
        elif key.startswith("angle"):
            assert value == pytest.approx(want, rel=1e-4, abs=1e-3), key
        else:
            assert value == pytest.approx(want, rel=1e-4, abs=1e-6), key
    assert got.odd_column == bool(np.prod(shape[1:]) % 2)


def test_energy_shares_match_svd_to_1e3() -> None:
    """DESIGN §3: a Gram eigensolve is fine when energy shares are within 1e-3 of the SVD."""
    rng = np.random.default_rng(0)
    for shape in [(300, 80), (80, 300), (256, 256), (1000, 5)]:
        m = rng.standard_normal(shape) @ np.diag(np.logspace(0, -3, shape[1]))
        ours = energies(torch.from_numpy(m).float()).numpy()
        ref = np.linalg.svd(m, compute_uv=False) ** 2
        assert np.max(np.abs(np.cumsum(ours) / ours.sum() - np.cumsum(ref) / ref.sum())) < 1e-3


def test_spectrum_stats_on_known_spectrum() -> None:
    e = np.array([5.0, 3.0, 1.0, 0.5, 0.5])  # cumulative 0.5, 0.8, 0.9, 0.95, 1.0
    st = spectrum_stats(e, (5, 10))
    assert st.rank_90 == 3
    assert st.energy_30 == pytest.approx(0.8)  # ceil(0.3*5) = 2 values
    assert math.isnan(spectrum_stats(np.zeros(4), (4, 4)).energy_30)


def test_random_baseline_matches_numpy_gaussian() -> None:
    rng = np.random.default_rng(1)
    ref = []
    for _ in range(5):
        sv = np.linalg.svd(rng.standard_normal((120, 200)), compute_uv=False) ** 2
        ref.append(sv[:36].sum() / sv.sum())
    assert random_energy_30(120, 200) == pytest.approx(np.mean(ref), abs=0.01)


def test_rotation_roundtrip_and_numpy_rotation() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((20, 11)).astype(np.float32)
    theta = rng.uniform(-3, 3, (20, 5)).astype(np.float32)
    rotated = rotate_pairs(torch.from_numpy(w), torch.from_numpy(theta)).numpy()
    ref = w.copy()
    for j in range(5):
        c, s = np.cos(theta[:, j]), np.sin(theta[:, j])
        ref[:, 2 * j], ref[:, 2 * j + 1] = w[:, 2 * j] * c - w[:, 2 * j + 1] * s, w[:, 2 * j] * s + w[:, 2 * j + 1] * c
    np.testing.assert_allclose(rotated, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(w, axis=1), rtol=1e-5)
    back = implied_angles(torch.from_numpy(w), torch.from_numpy(rotated)).numpy()
    np.testing.assert_allclose(np.angle(np.exp(1j * (back - theta))), 0, atol=1e-4)


def test_tiny_angles_keep_precision() -> None:
    """1 - cos in float32 would read 0 here; the unit-vector difference does not."""
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(3))
    theta = torch.full((16, 256), 1e-4)
    rc = row_change(w, rotate_pairs(w, theta))
    assert torch.allclose(rc.angle_deg, torch.full((16,), math.degrees(1e-4)).double(), rtol=1e-2)


def test_zero_and_nonfinite_rows_are_excluded() -> None:
    rng = np.random.default_rng(4)
    t = rng.standard_normal((10, 8)).astype(np.float32)
    s = t * 1.1
    t[2] = 0.0
    s[5, 3] = np.nan
    s[7, 0] = np.inf
    got = matrix_stats(torch.from_numpy(t), torch.from_numpy(s))
    assert got.rows_excluded == 3 and got.nonfinite_rows == 2
    assert got.norm_rel_mean == pytest.approx(0.1, rel=1e-5)
    assert math.isfinite(got.rel_delta) and math.isfinite(got.theta_energy_30)


def test_single_row_and_single_column() -> None:
    one_row = matrix_stats(torch.ones(1, 6), torch.ones(1, 6) * 2)
    assert one_row.norm_rel_mean == pytest.approx(1.0) and one_row.dir_mean == pytest.approx(0.0, abs=1e-7)
    one_col = matrix_stats(torch.ones(6, 1), torch.ones(6, 1) * 3)
    assert one_col.norm_rel_mean == pytest.approx(2.0) and one_col.theta_rank_90 == 0 and one_col.odd_column


@pytest.mark.parametrize("shape", [(300, 1000), (640, 640)])
def test_marchenko_pastur_baseline_matches_a_sample(shape: tuple[int, int]) -> None:
    from weightlens.stats import marchenko_pastur_energy

    rng = np.random.default_rng(5)
    sv = np.linalg.svd(rng.standard_normal(shape), compute_uv=False) ** 2
    k = math.ceil(0.3 * min(shape))
    assert marchenko_pastur_energy(min(shape) / max(shape), 0.3) == pytest.approx(sv[:k].sum() / sv.sum(), abs=3e-3)
    assert random_energy_30(*shape) == pytest.approx(sv[:k].sum() / sv.sum(), abs=3e-3)
