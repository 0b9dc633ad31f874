"""wadi_train.evaluation: FID against the classic scipy.linalg.sqrtm reference, statistics
files, and the digits judge on the real (bundled) scikit-learn digits: split, classifier
accuracy, FID orderings, sample metrics and the weights cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from wadi_train.evaluation import (
    FEATURE_DIM,
    DigitsClassifier,
    DigitsSplit,
    EvaluationError,
    FeatureStats,
    classifier_accuracy,
    evaluate_samples,
    extract_features,
    feature_stats,
    frechet_distance,
    load_digits_split,
    load_or_train_classifier,
    load_stats,
    reference_stats,
    save_stats,
    train_classifier,
)
from wadi_train.evaluation import digits as digits_mod
from wadi_train.evaluation.fid import fid


def scipy_fid(a: FeatureStats, b: FeatureStats) -> float:
    """The classic formula (pytorch-fid): |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)).real."""
    diff = a.mu - b.mu
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    return float(diff @ diff + np.trace(a.sigma + b.sigma - 2 * covmean).real)


def _correlated(
    rng: np.random.Generator, n: int, d: int, scale: float = 1.0, shift: float = 0.0
) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return scale * rng.normal(size=(n, d)) @ mix + shift


# ---------------------------------------------------------------------------- FID maths


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("n_per_d", [4.0, 0.5], ids=["n>D", "n<D"])
def test_frechet_distance_matches_scipy_sqrtm_reference(d: int, n_per_d: float) -> None:
    rng = np.random.default_rng(d)
    n = int(n_per_d * d) + 1
    a = feature_stats(_correlated(rng, n, d))
    b = feature_stats(_correlated(rng, n, d, scale=1.3, shift=0.2))
    expected = scipy_fid(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric_and_zero_on_identical_stats() -> None:
    rng = np.random.default_rng(1)
    a = feature_stats(_correlated(rng, 300, 64))
    b = feature_stats(_correlated(rng, 300, 64, scale=0.7))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) > 1.0


def test_fid_small_between_halves_of_one_distribution_and_large_against_noise() -> None:
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(16, 16))
    x = rng.normal(size=(4000, 16)) @ mix + 3.0  # one correlated, shifted Gaussian
    noise = rng.normal(size=(2000, 16))  # standard Gaussian "features"
    same = fid(x[:2000], x[2000:])
    other = fid(x[:2000], noise)
    assert same < 0.02 * other
    assert other > 100.0


def test_feature_stats_tensor_matches_numpy_and_float64() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    from_tensor, from_numpy = feature_stats(x), feature_stats(x.numpy())
    assert from_tensor.sigma.dtype == np.float64 and from_tensor.mu.shape == (8,)
    reference = np.cov(x.numpy().astype(np.float64), rowvar=False)
    np.testing.assert_allclose(from_tensor.sigma, reference, rtol=1e-12)
    np.testing.assert_array_equal(from_tensor.mu, from_numpy.mu)
    assert from_tensor.n == 50


@pytest.mark.parametrize(
    "bad",
    [np.zeros(5), np.zeros((1, 4)), np.array([[0.0, np.nan], [1.0, 2.0]])],
    ids=["1-d", "one-row", "nan"],
)
def test_feature_stats_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(EvaluationError):
        feature_stats(bad)


def test_frechet_distance_rejects_mismatched_dims_and_non_psd() -> None:
    rng = np.random.default_rng(3)
    a, b = feature_stats(rng.normal(size=(20, 4))), feature_stats(rng.normal(size=(20, 5)))
    with pytest.raises(EvaluationError, match="dimensions differ"):
        frechet_distance(a, b)
    not_psd = FeatureStats(mu=np.zeros(4), sigma=-np.eye(4), n=10)
    with pytest.raises(EvaluationError, match="positive semi-definite"):
        frechet_distance(not_psd, a)


def test_stats_save_load_roundtrip(tmp_path: Path) -> None:
    stats = feature_stats(np.random.default_rng(4).normal(size=(30, 6)))
    path = save_stats(stats, tmp_path / "ref" / "digits-8px")  # no suffix: kept as given
    assert path.exists()
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == stats.n
    assert frechet_distance(loaded, stats) < 1e-12


def test_load_stats_explains_broken_files(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(EvaluationError, match="cannot read"):
        load_stats(garbage)
    incomplete = tmp_path / "incomplete.npz"
    np.savez(incomplete, mu=np.zeros(3))
    with pytest.raises(EvaluationError, match="missing"):
        load_stats(incomplete)
    with pytest.raises(EvaluationError):
        load_stats(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------- digits data


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(size=8)


def test_split_shapes_ranges_and_dtypes(split: DigitsSplit) -> None:
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.long
    for x in (split.x_train, split.x_test):
        assert x.min() == -1.0 and x.max() == 1.0  # pixel 0 -> -1, pixel 16 -> 1
    assert set(split.y_test.tolist()) == set(range(10))


def test_split_is_stratified(split: DigitsSplit) -> None:
    train = torch.bincount(split.y_train, minlength=10).double()
    test = torch.bincount(split.y_test, minlength=10).double()
    expected = (train + test) * 0.25
    assert torch.all((test - expected).abs() <= 1.0)


def test_split_is_deterministic_and_seeded(split: DigitsSplit) -> None:
    again = load_digits_split(size=8)
    assert torch.equal(again.x_test, split.x_test) and torch.equal(again.y_train, split.y_train)
    other = load_digits_split(size=8, seed=1)
    assert not torch.equal(other.y_test, split.y_test)


def test_split_16px_is_upsampled_and_clamped(split: DigitsSplit) -> None:
    big = load_digits_split(size=16)
    assert big.x_test.shape == (450, 1, 16, 16) and big.size == 16
    assert big.x_test.min() >= -1.0 and big.x_test.max() <= 1.0
    assert torch.equal(big.y_test, split.y_test)
    down = torch.nn.functional.avg_pool2d(big.x_test, 2)  # (N, 1, 8, 8)
    assert (down - split.x_test).abs().mean() < 0.25


@pytest.mark.parametrize("kwargs", [{"size": 12}, {"test_fraction": 1.0}])
def test_split_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(EvaluationError):
        load_digits_split(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("size", [8, 16])
def test_classifier_shapes_for_both_sizes(size: int) -> None:
    model = DigitsClassifier(size=size).eval()
    x = torch.zeros(3, 1, size, size)
    assert model.features(x).shape == (3, FEATURE_DIM)
    assert model(x).shape == (3, 10)


@pytest.fixture(scope="module")
def classifier(split: DigitsSplit) -> DigitsClassifier:
    return train_classifier(split)  # default epochs: ~10 s on a busy 2-core CPU


@pytest.fixture(scope="module")
def reference(classifier: DigitsClassifier, split: DigitsSplit) -> FeatureStats:
    return reference_stats(classifier, split)


def test_classifier_reaches_high_test_accuracy(
    classifier: DigitsClassifier, split: DigitsSplit
) -> None:
    assert not classifier.training
    assert classifier_accuracy(classifier, split.x_test, split.y_test) >= 0.95


def test_training_is_deterministic_and_leaves_global_rng_alone(split: DigitsSplit) -> None:
    small = DigitsSplit(
        split.x_train[:200], split.y_train[:200], split.x_test[:50], split.y_test[:50]
    )
    state = torch.get_rng_state()
    a = train_classifier(small, epochs=1, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_classifier(small, epochs=1, seed=5)
    c = train_classifier(small, epochs=1, seed=6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.head.weight, c.head.weight)


def test_fid_orders_test_train_and_noise(
    classifier: DigitsClassifier, split: DigitsSplit, reference: FeatureStats
) -> None:
    noise = torch.rand(450, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    def fid_to_test(images: torch.Tensor) -> float:
        return frechet_distance(reference, feature_stats(extract_features(classifier, images)))

    test_vs_test = fid_to_test(split.x_test)
    test_vs_train = fid_to_test(split.x_train)
    test_vs_noise = fid_to_test(noise)
    log = logging.getLogger(__name__)
    log.info("FID test/train %.3f, test/noise %.3f", test_vs_train, test_vs_noise)
    assert test_vs_test < 1e-8
    assert test_vs_train < 0.05 * test_vs_noise
    assert test_vs_noise > 50.0


def test_evaluate_samples_scores_real_and_noise_images(
    classifier: DigitsClassifier, split: DigitsSplit, reference: FeatureStats
) -> None:
    real = evaluate_samples(classifier, split.x_test, split.y_test, reference, batch_size=100)
    assert real.n == 450 and real.accuracy >= 0.95 and real.fid < 1e-8
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fake = evaluate_samples(classifier, noise, split.y_test[:200], reference)
    assert fake.accuracy < 0.5 and fake.fid > 50.0


def test_evaluate_samples_rejects_mismatched_input(
    classifier: DigitsClassifier, split: DigitsSplit, reference: FeatureStats
) -> None:
    with pytest.raises(EvaluationError, match="8px classifier"):
        labels = torch.zeros(4, dtype=torch.long)
        evaluate_samples(classifier, torch.zeros(4, 1, 16, 16), labels, reference)
    with pytest.raises(EvaluationError, match="labels"):
        evaluate_samples(classifier, split.x_test[:4], split.y_test[:3], reference)
    with pytest.raises(EvaluationError, match="labels"):
        evaluate_samples(classifier, split.x_test[:4], torch.full((4,), 10), reference)


# ---------------------------------------------------------------------------- cache


def test_classifier_cache_roundtrip(
    tmp_path: Path, split: DigitsSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_or_train_classifier(tmp_path, split, 8, epochs=2)
    meta = json.loads((tmp_path / "classifier-8px.json").read_text())
    assert (tmp_path / "classifier-8px.safetensors").exists()
    assert meta["seed"] == 0 and 0.0 <= meta["test_accuracy"] <= 1.0

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(digits_mod, "train_classifier", no_training)
    second = load_or_train_classifier(tmp_path, split, 8)
    with torch.no_grad():
        assert torch.equal(first(split.x_test), second(split.x_test))


def test_broken_cache_is_retrained_with_a_warning(
    tmp_path: Path, split: DigitsSplit, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "classifier-8px.safetensors"
    weights.write_bytes(b"definitely not safetensors")
    with caplog.at_level(logging.WARNING, logger="wadi_train.evaluation.digits"):
        model = load_or_train_classifier(tmp_path, split, 8, epochs=1)
    assert "unusable" in caplog.text
    assert isinstance(model, DigitsClassifier)
    # the rewritten cache now loads
    again = load_or_train_classifier(tmp_path, split, 8, epochs=1)
    assert torch.equal(again.head.weight, model.head.weight)


def test_cache_with_wrong_shapes_is_retrained(
    tmp_path: Path, split: DigitsSplit, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 3)}, str(tmp_path / "classifier-8px.safetensors"))
    with caplog.at_level(logging.WARNING, logger="wadi_train.evaluation.digits"):
        load_or_train_classifier(tmp_path, split, 8, epochs=1)
    assert "unusable" in caplog.text


def test_cache_rejects_split_of_another_size(tmp_path: Path, split: DigitsSplit) -> None:
    with pytest.raises(EvaluationError, match="size=16"):
        load_or_train_classifier(tmp_path, split, 16)
