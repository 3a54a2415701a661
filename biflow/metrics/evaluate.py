"""Evaluate generated images against a dataset: Fréchet distance, Inception Score, class accuracy, speed.

Model-agnostic: samples are arrays (uint8 NHWC, or float NCHW in [-1, 1]) or come from a callable
`sample_fn(n, labels) -> images`; nothing here knows which model drew them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biflow.metrics._io import MetricError, array_hash, as_uint8_nhwc
from biflow.metrics.features import FeatureNet, inception_score
from biflow.metrics.frechet import FeatureStats, StatsCache
from biflow.metrics.speed import time_sampler


@dataclass(frozen=True)
class Reference:
    """The real data samples are compared with: usually the training split."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None  # int64 (N,), or None for unlabelled data
    content_hash: str  # identifies the data in cache keys (the shard manifest's hash)
    split: str = "train"

    @classmethod
    def from_arrays(cls, images, labels=None, split: str = "train", content_hash: str | None = None) -> "Reference":
        images = as_uint8_nhwc(images)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        return cls(images, labels, content_hash or array_hash(images, labels), split)

    @classmethod
    def from_shardset(cls, shards: Any, split: str | None = None) -> "Reference":
        """From a `biflow.data.ShardSet` (anything with images, labels, meta, content_hash)."""
        split = split or (getattr(shards, "meta", {}) or {}).get("split", "train")
        return cls.from_arrays(shards.images, shards.labels, split, getattr(shards, "content_hash", "") or None)

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


def _features(net: FeatureNet, images: np.ndarray, batch_size: int | None, logits: bool):
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if logits:
        return net.features_and_logits(images, **kw)
    return net.features(images, **kw), None


def reference_stats(reference: Reference, net: FeatureNet, cache_dir: str | Path | None = None, *,
                    max_images: int | None = None, seed: int = 0, batch_size: int | None = None) -> FeatureStats:
    """Feature statistics of the reference images, from `<cache_dir>/<key>.npz` when computed before.

    max_images: use a fixed random subset (seeded) of that size; the subset is part of the cache key.
    """
    images, split = reference.images, reference.split
    if max_images is not None and len(images) > max_images:
        idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images])
        images, split = images[idx], f"{split}[{max_images} of {len(reference.images)}, seed {seed}]"

    def compute() -> FeatureStats:
        return FeatureStats.from_features(_features(net, images, batch_size, False)[0])

    if cache_dir is None:
        return compute()
    return StatsCache(cache_dir).get_or_compute(reference.content_hash, net.id, split, compute)


def _wants_is(net: FeatureNet) -> bool:
    """The Inception Score is defined on Inception's ImageNet classifier only (not on a dataset classifier)."""
    return net.metric_name == "fid" and bool(getattr(net, "has_logits", False))


def evaluate_samples(samples, labels, reference: Reference, feature_net: FeatureNet, cache_dir: str | Path | None = None, *,
                     classifier: Any = None, batch_size: int | None = None, max_reference: int | None = None,
                     is_splits: int = 10) -> dict[str, Any]:
    """Score samples against the reference.

    Returns {<feature_net.metric_name>: Fréchet distance ("fid" or "fd_evaluator"), "is", "is_std"
    (None unless the network has an ImageNet logits head), "class_acc" (None unless labels are given
    and a classifier is available: `classifier`, or the feature net itself if it classifies),
    "num_samples", "num_reference", "features", "feature_id"}.
    """
    samples = as_uint8_nhwc(samples)
    if samples.shape[1:] != reference.images.shape[1:]:
        raise MetricError(f"samples have shape {samples.shape[1:]} per image, the reference data {reference.images.shape[1:]}")
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if labels.shape != (len(samples),):
            raise MetricError(f"labels must have shape ({len(samples)},), got {labels.shape}")
    ref = reference_stats(reference, feature_net, cache_dir, max_images=max_reference, batch_size=batch_size)
    feats, logits = _features(feature_net, samples, batch_size, _wants_is(feature_net))
    out: dict[str, Any] = {feature_net.metric_name: ref.frechet(FeatureStats.from_features(feats))}
    out["is"], out["is_std"] = inception_score(logits, is_splits) if logits is not None else (None, None)
    clf = classifier if classifier is not None else (feature_net if getattr(feature_net, "classifies", False) else None)
    out["class_acc"] = float((clf.predict(samples) == labels).mean()) if labels is not None and clf is not None else None
    out.update(num_samples=int(len(samples)), num_reference=int(ref.n), features=feature_net.name, feature_id=feature_net.id)
    return out


def balanced_labels(num: int, num_classes: int) -> np.ndarray | None:
    """0, 1, ..., K-1, 0, 1, ...: equal class counts (None for an unconditional model)."""
    return (np.arange(num) % num_classes).astype(np.int64) if num_classes else None


def evaluate_sampler(sample_fn: Callable[[int, torch.Tensor | None], Any], num: int, reference: Reference,
                     feature_net: FeatureNet, cache_dir: str | Path | None = None, *, num_classes: int = 0,
                     batch: int = 256, time_batch: int | None = None, repeats: int = 3, warmup: int = 1,
                     device: str | torch.device | None = None, classifier: Any = None, max_reference: int | None = None,
                     feature_batch: int | None = None, log: Callable[[str], None] | None = None,
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None, keep: int = 0) -> dict[str, Any]:
    """Draw `num` samples with `sample_fn(n, labels)` in batches, time it, and score them.

    Class-conditional (num_classes > 0): labels are balanced over classes, passed as a CPU int64
    tensor, and used for class accuracy. Timing runs `repeats` extra batches of `time_batch`
    (default: `batch`, at most `num`) after `warmup` ones; the result adds ms_per_image,
    images_per_s, the full timing record, and sample_seconds (wall time of drawing all samples).
    decode: latent-space samplers, latents -> images (the VAE decoder); scored on the decoded images,
    its cost timed apart (decode_ms_per_image; ms_per_image is the generator alone, as the paper reports).
    keep: the first `keep` images (uint8 NHWC) are returned under "images" (sample grids).
    """
    if num < 2:
        raise MetricError(f"need at least 2 samples, got {num}")
    labels = balanced_labels(num, num_classes)
    chunks, t0 = [], time.perf_counter()
    for start in range(0, num, batch):
        n = min(batch, num - start)
        y = None if labels is None else torch.from_numpy(labels[start : start + n])
        samples = sample_fn(n, y)
        chunk = as_uint8_nhwc(decode(samples) if decode is not None else samples)
        if len(chunk) != n:
            raise MetricError(f"sampler returned {len(chunk)} images, asked for {n}")
        chunks.append(chunk)
        if log is not None:
            log(f"sampled {start + n}/{num}")
    sample_seconds = time.perf_counter() - t0

    def draw(b: int):
        y = balanced_labels(b, num_classes)
        return sample_fn(b, None if y is None else torch.from_numpy(y))

    tb = time_batch or min(batch, num)
    timing = time_sampler(draw, tb, repeats=repeats, warmup=warmup, device=device)
    decode_timing = None
    if decode is not None:
        latents = draw(tb)
        decode_timing = time_sampler(lambda b: decode(latents[:b]), tb, repeats=repeats, warmup=warmup, device=device)
    if log is not None:
        log(f"timing: {timing['ms_per_image']:.3f} ms/image at batch {timing['batch']}"
            + (f" (+{decode_timing['ms_per_image']:.3f} ms/image VAE decoding)" if decode_timing else "")
            + f"; scoring with {feature_net.name}")
    images = np.concatenate(chunks)
    out = evaluate_samples(images, labels, reference, feature_net, cache_dir, classifier=classifier,
                           batch_size=feature_batch, max_reference=max_reference)
    out.update(ms_per_image=timing["ms_per_image"], images_per_s=timing["images_per_s"], timing=timing,
               sample_seconds=sample_seconds,
               decode_ms_per_image=decode_timing["ms_per_image"] if decode_timing else None, decode_timing=decode_timing)
    if keep:
        out["images"] = images[:keep]
    return out
