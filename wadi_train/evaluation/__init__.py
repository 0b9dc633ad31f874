"""Evaluation: FID from feature statistics, the digits judge, and paper-style FID / CLIP score.

`fid` computes the Fréchet distance between Gaussian fits of feature sets (without
`scipy.linalg.sqrtm`) and stores reference statistics; `digits` holds the embedded default's
data (scikit-learn's bundled 8x8 digits, nothing downloads) and the CNN whose penultimate
features and predictions score class-conditional samples. `model_eval` (`wadi-train eval`)
scores an exported student the way papers report it: one-step images over a caption file,
FID in `inception`'s TensorFlow-compatible Inception-v3 features, `clip_score` with a local
CLIP; `text_to_image` turns prompts into one-step images.

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
from wadi_train.evaluation.clip_score import ClipScorer, load_clip
from wadi_train.evaluation.errors import EvaluationError
from wadi_train.evaluation.fid import (
    FeatureStats,
    StatsAccumulator,
    feature_stats,
    frechet_distance,
    load_stats,
    save_stats,
)
from wadi_train.evaluation.inception import FIDInceptionV3, load_inception
from wadi_train.evaluation.model_eval import EvalConfig, evaluate_model, load_eval_config

__all__ = [
    "EvaluationError",
    "FeatureStats",
    "StatsAccumulator",
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
    "FIDInceptionV3",
    "load_inception",
    "ClipScorer",
    "load_clip",
    "EvalConfig",
    "load_eval_config",
    "evaluate_model",
]
