"""Block-wise statistics and zero-copy reading: the memory-bounded paths give the one-shot answers.

A layer is read in row blocks (or column blocks for the Gram of a wide matrix) and converted
to float32 block by block; these tests pin every block boundary case against one-shot
float64 references, and the readers' mmap path against safetensors' own reader.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_stats import np_reference

import weightlens
from weightlens.io import SafetensorsReader
from weightlens.rotation import implied_angles, implied_rotation_residual, rotate_pairs
from weightlens.stats import matrix_stats, rotation_explained, row_change, spectral_change

# Odd widths, a width with no segment divisor (1031 is prime), 1-row and 1-column layers,
# tall and wide, 4-D conv kernels.
SHAPES = [(1, 6), (1, 7), (7, 130), (130, 7), (33, 65), (300, 301), (5, 1031), (64, 16, 3, 3), (9, 1), (40, 3, 3, 3)]
CHUNKS = [1, 7, 64, 1000, 1 << 30]  # 1 element: one row (or column pair) per block; 2**30: one block


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    scale = 1 + 0.1 * torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen)
    return t, t * scale + 0.05 * torch.randn(shape, generator=gen)


def _reference_grams(t: torch.Tensor, s: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray]:
    """Theta and residual Grams computed one-shot in float64, each of its smaller side."""
    wt, ws = t.reshape(t.shape[0], -1).double().numpy(), s.reshape(s.shape[0], -1).double().numpy()
    width = wt.shape[1]
    ut = wt / np.linalg.norm(wt, axis=1, keepdims=True)
    us = ws / np.linalg.norm(ws, axis=1, keepdims=True)
    d = us - ut
    theta = implied_angles(torch.from_numpy(wt), torch.from_numpy(ws)).numpy()

    def gram(m: np.ndarray) -> np.ndarray:
        return m.T @ m if m.shape[0] > m.shape[1] else m @ m.T

    return (gram(theta) if width >= 2 else None), gram(d)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius error; an all-zero reference (an unchanged direction) allows 1e-10 absolute."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-5))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_grams_equal_one_shot(shape: tuple[int, ...], chunk: int) -> None:
    t, s = _pair(shape, seed=sum(shape))
    want_theta, want_resid = _reference_grams(t, s)
    sp = spectral_change(t, s, row_change(t, s, chunk), chunk)
    assert _rel(sp.resid_gram.double().numpy(), want_resid) < 1e-5
    if want_theta is None:
        assert sp.theta_gram is None
    else:
        assert _rel(sp.theta_gram.double().numpy(), want_theta) < 1e-5
    wt, ws = t.reshape(shape[0], -1), s.reshape(shape[0], -1)
    if wt.shape[1] >= 2:  # the closed-form rotation residual is the rotated-copy definition
        want_rot = rotation_explained(wt, ws, implied_angles(wt, ws))
        got_rot = 1 - sp.rotation_residual / float((ws - wt).double().square().sum())
        assert got_rot == pytest.approx(want_rot, abs=1e-5)  # both float32: ~1e-6 apart on 3-pair rows


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if math.prod(s[1:]) >= 2])  # the reference needs column pairs
def test_blockwise_stats_match_numpy(shape: tuple[int, ...], chunk: int) -> None:
    t, s = _pair(shape, seed=sum(shape) + 1)
    got = matrix_stats(t, s, chunk_elements=chunk)
    ref = np_reference(t.numpy(), s.numpy())
    for key, want in ref.items():
        value = getattr(got, key)
        if key.endswith("rank_90"):
            assert abs(value - want) <= 1, (key, value, want)  # a tie at exactly 90 % may flip
        else:
            assert value == pytest.approx(want, rel=1e-4, abs=1e-6), key
    one_shot = matrix_stats(t, s, chunk_elements=1 << 30)
    np.testing.assert_allclose(got.theta_energy, one_shot.theta_energy, rtol=1e-5, atol=1e-6 * max(one_shot.theta_energy.max(initial=0), 1))
    np.testing.assert_allclose(got.resid_energy, one_shot.resid_energy, rtol=1e-5, atol=1e-6 * max(one_shot.resid_energy.max(initial=0), 1))


def test_norm_change_precision_on_a_million_wide_row() -> None:
    """A float32 norm over 2**20 values drifts by ~1e-5; a 1e-4 norm change must still read right."""
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(2, 1 << 20, generator=gen) * 0.02
    s = t * (1 + 1e-4)
    got = row_change(t, s)
    mt = np.linalg.norm(t.double().numpy(), axis=1)
    ms = np.linalg.norm(s.double().numpy(), axis=1)
    np.testing.assert_allclose(got.norm_rel.numpy(), np.abs(ms - mt) / mt, rtol=1e-4)
    assert float(got.dir.max()) < 1e-6  # a pure scaling does not turn a row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_converted_block_by_block(dtype: torch.dtype) -> None:
    t, s = (x.to(dtype) for x in _pair((70, 90), seed=3))
    a = matrix_stats(t, s, chunk_elements=500)
    b = matrix_stats(t.float(), s.float(), chunk_elements=1 << 30)
    for key in ("norm_rel_mean", "dir_mean", "rel_delta", "rotation_explained", "theta_energy_30", "resid_energy_30"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-6), key


def test_float32_overflow_rows_are_redone_in_float64() -> None:
    """Finite weights whose float32 squares overflow give the statistics of the rescaled layer."""
    t, s = _pair((12, 40), seed=4)
    big_t, big_s = t.clone(), s.clone()
    big_t[3] *= 1e30
    big_s[3] *= 1e30
    got, want = row_change(big_t, big_s, chunk_elements=80), row_change(t, s)
    assert got.nonfinite_rows == 0 and got.excluded == 0 and got.float64
    np.testing.assert_allclose(got.norm_rel.numpy(), want.norm_rel.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.dir.numpy(), want.dir.numpy(), rtol=1e-5)


def test_nonfinite_rows_across_block_boundaries() -> None:
    t, s = _pair((10, 8), seed=5)
    s[5, 3] = float("nan")
    t[7, 0] = float("inf")
    for chunk in (1, 8, 24, 1 << 30):
        got = matrix_stats(t, s, chunk_elements=chunk)
        assert got.nonfinite_rows == 2 and got.rows_excluded == 2
        assert all(math.isfinite(getattr(got, k)) for k in ("rel_delta", "theta_energy_30", "resid_energy_30", "rotation_explained"))
    keep = [i for i in range(10) if i not in (5, 7)]
    clean = matrix_stats(t[keep], s[keep])
    assert got.dir_mean == pytest.approx(clean.dir_mean, rel=1e-6)
    assert got.norm_rel_mean == pytest.approx(clean.norm_rel_mean, rel=1e-6)


def test_implied_rotation_residual_is_the_rotated_copy() -> None:
    t, s = _pair((9, 11), seed=6)
    theta = implied_angles(t, s)
    want = float((s - rotate_pairs(t, theta)).double().square().sum())
    assert float(implied_rotation_residual(t, s)) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------- zero-copy reading


def _mapped_regions(path: Path) -> list[tuple[int, int]]:
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in re.match(r"([0-9a-f]+)-([0-9a-f]+)", line).groups())  # type: ignore[union-attr]
            regions.append((lo, hi))
    return regions


def test_safetensors_reader_maps_tensors_without_copying(tmp_path: Path) -> None:
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps")
    tensors = {
        "w32": torch.randn(33, 17),
        "odd": torch.arange(3, dtype=torch.int8),  # 3 bytes: what follows may be misaligned
        "w16": torch.randn(5, 7).half(),
        "bf": torch.randn(4, 6).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    reader = SafetensorsReader(path)
    with safe_open(str(path), framework="pt") as fh:
        for key, want in tensors.items():
            got = reader.get(key)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, fh.get_tensor(key)), key
    w = reader.get("w32")
    ptr = w.untyped_storage().data_ptr()
    assert any(lo <= ptr < hi for lo, hi in _mapped_regions(path)), "w32 is not a view of the file"
    reader.close()
    assert torch.equal(w, tensors["w32"])  # a tensor outlives its reader
    w.add_(1.0)  # copy-on-write: the file is never written
    with safe_open(str(path), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("w32"), tensors["w32"])


# ---------------------------------------------------------------------------- parallel layers


def _save_pair(unet_pair, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    save_file(unet_pair.teacher, tmp_path / "t.safetensors")
    save_file(unet_pair.student, tmp_path / "s.safetensors")
    return tmp_path / "t.safetensors", tmp_path / "s.safetensors"


def test_workers_give_identical_results_in_order(unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t, s = _save_pair(unet_pair, tmp_path)
    names: dict[int, list[str]] = {}
    runs = {}
    for workers in (1, 3):
        names[workers] = []
        runs[workers] = weightlens.compare(t, s, weightlens.CompareOptions(timestamps=False, workers=workers), progress=lambda d, n, name, w=workers: names[w].append(name))
    assert names[1] == names[3]
    # Equal to rounding: the Gram products may split differently over 2 threads than over 1.
    pd.testing.assert_frame_equal(runs[1].layers.to_pandas(), runs[3].layers.to_pandas(), rtol=1e-6)
    for name, e in runs[1].theta_spectra.items():
        np.testing.assert_allclose(runs[3].theta_spectra[name], e, rtol=1e-5, atol=1e-6 * max(e.max(initial=0), 1))


def test_at_most_workers_pairs_in_flight(unet_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """At most `workers` pairs hold mapped tensors at once: a pair's tensors are fetched when a
    worker takes it (queued pairs hold nothing), and released when its statistics are done."""
    compare_module = importlib.import_module("weightlens.compare")  # the package re-exports a function of that name

    t, s = _save_pair(unet_pair, tmp_path)
    lock = threading.Lock()
    open_tensors, worst, pairs_done = [0], [0], [0]
    get = SafetensorsReader.get

    def counting_get(self, key):  # type: ignore[no-untyped-def]
        with lock:
            open_tensors[0] += 1
            worst[0] = max(worst[0], open_tensors[0])
        return get(self, key)

    def finishing(fn):  # type: ignore[no-untyped-def]
        def wrapped(pair, *args):  # type: ignore[no-untyped-def]
            out = fn(pair, *args)
            with lock:
                open_tensors[0] -= 2  # the pair's teacher and student tensor
                pairs_done[0] += 1
            return out
        return wrapped

    monkeypatch.setattr(SafetensorsReader, "get", counting_get)
    monkeypatch.setattr(compare_module, "_layer_stats", finishing(compare_module._layer_stats))
    monkeypatch.setattr(compare_module, "_vector_stats", finishing(compare_module._vector_stats))
    threads = torch.get_num_threads()
    a = weightlens.compare(t, s, weightlens.CompareOptions(timestamps=False, workers=2))
    assert pairs_done[0] == len(a.layers) + len(a.vectors) > 10
    assert 2 <= worst[0] <= 2 * 2  # both workers busy at some point, never more than two pairs open
    assert torch.get_num_threads() == threads  # intra-op threads restored


def test_workers_do_not_wait_behind_a_slow_layer(unet_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """While one worker is stuck on a slow layer, the other goes on with the layers after it
    (results are still yielded in order)."""
    compare_module = importlib.import_module("weightlens.compare")  # the package re-exports a function of that name

    t, s = _save_pair(unet_pair, tmp_path)
    slow_started, release = threading.Event(), threading.Event()
    done_meanwhile: list[str] = []
    layer_stats = compare_module._layer_stats
    first: list[str] = []

    def maybe_slow(pair, *args):  # type: ignore[no-untyped-def]
        if not first:
            first.append(pair.name)
            slow_started.set()
            assert release.wait(10), "the other worker never got through the queue"
        elif slow_started.is_set() and not release.is_set():
            done_meanwhile.append(pair.name)
            if len(done_meanwhile) >= 3:
                release.set()
        return layer_stats(pair, *args)

    monkeypatch.setattr(compare_module, "_layer_stats", maybe_slow)
    names: list[str] = []
    weightlens.compare(t, s, weightlens.CompareOptions(timestamps=False, workers=2), progress=lambda d, n, name: names.append(name))
    assert len(done_meanwhile) >= 3
    assert names.index(first[0]) < min(names.index(n) for n in done_meanwhile)  # yielded in order


def test_negative_workers_is_an_option_error(unet_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t, s = _save_pair(unet_pair, tmp_path)
    with pytest.raises(weightlens.WeightlensError, match="--workers"):
        weightlens.compare(t, s, weightlens.CompareOptions(workers=-1))


@pytest.mark.parametrize("shape", [(128, 128), (32, 129), (300, 20)])
def test_unchanged_layer_has_exactly_zero_theta(shape: tuple[int, int]) -> None:
    """An identical pair: Theta exactly 0 (no fused multiply-add residue), so no LoRaD rank."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    assert not implied_angles(t, t.clone()).any()
    got = matrix_stats(t, t.clone(), chunk_elements=1000)
    assert got.theta_energy.sum() == 0 and got.resid_energy.sum() == 0 and got.rel_delta == 0
