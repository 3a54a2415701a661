"""Fréchet distance between Gaussians fitted to features, and a disk cache of reference statistics.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))

computed in float64 with `scipy.linalg.sqrtm`, with the safeguards of the reference FID code
(TTUR's `fid.py`, pytorch-fid): when S1 S2 is singular or sqrtm returns non-finite values, retry
with eps*I added to both covariances; drop a negligible imaginary part of the result, and fail
loudly when it is not negligible. With "FID" we mean exactly this on InceptionV3 pool features.

Cost: sqrtm is O(d^3) through a complex Schur decomposition; at d = 2048 (Inception) it takes
tens of seconds on a 2-core CPU, at d = 128 (the small evaluator) milliseconds.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from biflow.atomic import atomic_path
from biflow.metrics._io import MetricError, digest

EPS = 1e-6  # diagonal offset for a singular covariance product (the reference code's value)
IMAG_TOL = 1e-3  # largest |imaginary part| on sqrtm's diagonal that counts as round-off


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy sqrtm, plus whether scipy flagged the input as singular."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return np.asarray(root), singular


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    A result that rounding pushes below zero is returned as 0 (the true value is >= 0).
    Raises MetricError on mismatched shapes, non-finite inputs, or a covariance product whose
    square root keeps a significant imaginary part (max |imag| on the diagonal > 1e-3):
    that means the statistics are broken, not that the distance is large.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricError(f"Fréchet distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise MetricError(f"Fréchet distance: {name} contains NaN or Inf")

    diff = mu1 - mu2
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular or not np.isfinite(covmean).all():
        # The product is singular (e.g. fewer samples than feature dimensions): regularise both.
        offset = np.eye(d) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise MetricError(f"Fréchet distance: sqrtm of the covariance product is not finite even with {eps:g}*I added")
    if np.iscomplexobj(covmean):
        # Only the trace is used, so only the diagonal's imaginary part matters (as in the reference code).
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > IMAG_TOL:
            raise MetricError(f"Fréchet distance: sqrtm(sigma1 @ sigma2) has an imaginary component of {imag:.3g} "
                              f"(> {IMAG_TOL:g}); the covariance matrices are not valid")
        covmean = covmean.real
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of n feature vectors: all a Fréchet distance needs."""

    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    n: int  # number of feature vectors

    @classmethod
    def from_features(cls, feats) -> "FeatureStats":
        """feats (N, d) -> stats; N >= 2 and every value finite, else MetricError."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2:
            raise MetricError(f"features must be a 2-d (N, d) array, got shape {f.shape}")
        if f.shape[0] < 2:
            raise MetricError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
        bad = ~np.isfinite(f)
        if bad.any():
            rows = int(bad.any(axis=1).sum())
            raise MetricError(f"features contain NaN or Inf in {rows} of {f.shape[0]} rows "
                              "(the images or the feature network produced non-finite values)")
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), n=int(f.shape[0]))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def frechet(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | Path) -> Path:
        """Write an .npz (mu, sigma, n) atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez would otherwise append ".npz" to the temp name
                np.savez(fh, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma, n = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), int(z["n"])
        except FileNotFoundError:
            raise MetricError(f"{path}: feature statistics not found") from None
        except Exception as err:
            raise MetricError(f"{path}: not a readable feature-statistics file ({type(err).__name__})") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricError(f"{path}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}")
        return cls(mu=mu, sigma=sigma, n=n)


# ------------------------------------------------------------------- reference cache
def reference_key(content_hash: str, feature_id: str, split: str) -> str:
    """Cache key of a dataset split's statistics under one feature network."""
    return digest("reference-stats-v1", content_hash, feature_id, split)


class StatsCache:
    """`<cache_dir>/<key>.npz` files of reference statistics, computed once and written atomically.

    The key covers the dataset's content hash, the feature network's identity (weights and
    preprocessing) and the split, so a changed dataset or network never reuses stale numbers.
    """

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def path(self, content_hash: str, feature_id: str, split: str) -> Path:
        return self.dir / f"{reference_key(content_hash, feature_id, split)}.npz"

    def get_or_compute(self, content_hash: str, feature_id: str, split: str,
                       compute: Callable[[], FeatureStats]) -> FeatureStats:
        path = self.path(content_hash, feature_id, split)
        if path.is_file():
            try:
                return FeatureStats.load(path)
            except MetricError as err:  # a damaged cache entry is recomputed, not fatal
                warnings.warn(f"recomputing reference statistics: {err}")
        stats = compute()
        stats.save(path)
        return stats
