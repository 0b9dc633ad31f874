"""Evaluation of generated digits: FID from feature statistics and a small digits judge.

`fid` computes the Fréchet distance between Gaussian fits of feature sets (without
`scipy.linalg.sqrtm`) and stores reference statistics; `digits` holds the embedded default's
data (scikit-learn's bundled 8x8 digits, nothing downloads) and the CNN whose penultimate
features and predictions score class-conditional samples.

The convenience `fid.fid(feats_a, feats_b)` is deliberately not re-exported here: a package
attribute `fid` would shadow the `fid` submodule (breaking `mock.patch` paths and
`import wadi_train.evaluation.fid as m`); import it as `from wadi_train.evaluation.fid import fid`.
"""

from wadi_train.evaluation.digits import (
    FEATURE_DIM,
    NUM_CLASSES,
    SIZES,
    DigitsClassifier,
    DigitsSplit,
    SampleMetrics,
    classifier_accuracy,
    evaluate_samples,
    extract_features,
    load_digits_split,
    load_or_train_classifier,
    reference_stats,
    train_classifier,
)
from wadi_train.evaluation.errors import EvaluationError
from wadi_train.evaluation.fid import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    load_stats,
    save_stats,
)

__all__ = [
    "EvaluationError",
    "FeatureStats",
    "feature_stats",
    "frechet_distance",
    "save_stats",
    "load_stats",
    "SIZES",
    "NUM_CLASSES",
    "FEATURE_DIM",
    "DigitsSplit",
    "load_digits_split",
    "DigitsClassifier",
    "train_classifier",
    "classifier_accuracy",
    "load_or_train_classifier",
    "extract_features",
    "reference_stats",
    "SampleMetrics",
    "evaluate_samples",
]
