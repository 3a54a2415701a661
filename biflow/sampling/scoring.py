"""Score one sampler of a checkpoint: draw samples, then quality (FID or fd_evaluator, IS, class accuracy) and
speed (ms/image, NFE). One function, `score_checkpoint`, serves `biflow eval`, the pipeline's evaluate step and
sweep trials, so the three report the same numbers in the same way.

Class accuracy always uses the dataset evaluator (a small CNN trained on the reference images, cached), and
only when it was trained on class labels (an unlabelled dataset's evaluator is trained on rotations).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from biflow.device import resolve_device
from biflow.errors import UserError
from biflow.sampling.draw import load_sampler

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """Metrics cache (reference statistics, trained evaluators): $BIFLOW_CACHE_DIR/metrics, else ~/.cache/biflow/metrics."""
    env = os.environ.get("BIFLOW_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "biflow") / "metrics"


def checkpoint_data(ckpt: dict[str, Any], data_dir: str | Path | None = None, log: Log | None = None):
    """(train, test) ShardSets a checkpoint's samples are compared with.

    data_dir: a prepared root (train/, test/), or where to prepare the checkpoint's dataset; None: the
    checkpoint's own data_dir when it still exists, else its data config prepared under the default data root.
    A training-data hash that differs from the checkpoint's is logged as a warning.
    """
    from biflow.config import DataConfig, validate
    from biflow.data import ShardError, load_split

    data_dir = Path(data_dir) if data_dir is not None else None
    try:
        if data_dir is not None and (data_dir / "train").is_dir():
            train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
        elif data_dir is None and ckpt.get("data_dir") and (Path(ckpt["data_dir"]) / "train").is_dir():
            train, test = load_split(ckpt["data_dir"], "train"), load_split(ckpt["data_dir"], "test")
        else:
            if not ckpt.get("data"):
                raise UserError("the checkpoint records no data config; pass --data-cache DIR (a prepared root with train/ and test/)")
            cfg = validate(DataConfig, ckpt["data"], "checkpoint data config")
            train, test = load_split(cfg, "train", root=data_dir), load_split(cfg, "test", root=data_dir)
    except ShardError as err:
        raise UserError(str(err)) from None
    expected = ckpt.get("data_hash")
    if expected and train.content_hash != expected and log is not None:
        log(f"warning: training data hash {train.content_hash[:12]} differs from the checkpoint's {expected[:12]}")
    return train, test


def warm_reference(data_dir: str | Path, features: str, inception_weights: str | Path | None, cache_dir: str | Path,
                   device: str | torch.device = "cpu", log: Log | None = None, max_reference: int | None = None) -> None:
    """Train the dataset evaluator and compute the reference statistics of `data_dir`'s train split into `cache_dir`,
    once, before several samplers (Ray tasks, sweep trials) are scored in parallel and load them from there.
    max_reference: a fixed seeded subset of that many training images (as score_checkpoint's)."""
    from biflow.data import load_split
    from biflow.metrics import Reference, get_feature_net, reference_stats

    reference = Reference.from_shardset(load_split(data_dir, "train"), "train")
    net = get_feature_net(features, inception_weights=inception_weights, reference=reference, cache_dir=cache_dir,
                          device=str(device), log=log)
    reference_stats(reference, net, cache_dir, max_images=max_reference)


def score_checkpoint(path: str | Path, sampler: str | None = None, *, num: int = 1000, guidance: float = 0.0,
                     denoise: bool = True, seed: int = 0, device: str | torch.device = "cpu", features: str = "evaluator",
                     inception_weights: str | Path | None = None, data_dir: str | Path | None = None,
                     cache_dir: str | Path | None = None, max_reference: int | None = None, batch: int = 250,
                     time_batch: int | None = None, repeats: int = 3, keep: int = 0, log: Log | None = None) -> dict[str, Any]:
    """Draw `num` samples from one sampler of the checkpoint at `path` and score them against its data.

    features: "evaluator" (fd_evaluator: Fréchet distance on the dataset evaluator's features) or "inception"
    (FID). Timing: `repeats` batches of `time_batch` (default `batch`, at most `num`) after one warm-up, median.
    keep: the first `keep` images come back under "grid" (uint8 NHWC), with balanced labels 0, 1, ..., K-1, 0, ...
    Returns a JSON-able dict (plus "grid") whose quality key is `metric_name` ("fd_evaluator" or "fid").
    """
    from biflow.metrics import Reference, evaluate_sampler, get_feature_net
    from biflow.metrics.evaluator import load_or_train_evaluator

    if num < 2:
        raise UserError("the number of samples must be at least 2")
    t_start, c_start = time.perf_counter(), time.process_time()
    device = resolve_device(device, "device")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    s = load_sampler(path, sampler, guidance, denoise, seed, device)
    ckpt = s.record  # the checkpoint without its tensors (read once, by load_sampler)
    train, test = checkpoint_data(ckpt, data_dir, log)
    reference = Reference.from_shardset(train, "train")
    net = get_feature_net(features, inception_weights=inception_weights, reference=reference, cache_dir=cache_dir,
                          device=str(device), log=log)
    classifier, evaluator_acc = None, None
    if s.num_classes:
        clf = net if features == "evaluator" else load_or_train_evaluator(
            reference.images, reference.labels, content_hash=reference.content_hash, cache_dir=cache_dir, device=device,
            log=log)
        if clf.classifies:  # trained on class labels, not the rotation fallback of unlabelled data
            classifier = clf
            evaluator_acc = clf.accuracy(test.images, test.labels) if len(test) else None
    if log is not None:
        log(f"{s.name}: drawing {num} samples (NFE {s.nfe}) on {device}")
    res = evaluate_sampler(s.sample, num, reference, net, cache_dir, num_classes=s.num_classes, batch=batch,
                           time_batch=min(time_batch or batch, num), repeats=repeats, warmup=1, device=device,
                           classifier=classifier, max_reference=max_reference, log=log, decode=s.decode, keep=keep)
    metric = net.metric_name
    out = {"checkpoint": str(path), "kind": ckpt["kind"], "sampler": s.name, "nfe": s.nfe, "guidance": guidance,
           "denoise": s.denoise, "features": features, "metric_name": metric, metric: res[metric], "is": res["is"],
           "is_std": res["is_std"], "class_acc": res["class_acc"], "evaluator_test_acc": evaluator_acc,
           "ms_per_image": res["ms_per_image"], "images_per_s": res["images_per_s"],
           "decode_ms_per_image": res["decode_ms_per_image"], "num_samples": res["num_samples"],
           "num_reference": res["num_reference"], "timing": res["timing"], "sample_seconds": res["sample_seconds"],
           "feature_id": res["feature_id"], "data_hash": reference.content_hash, "seed": seed,
           "torch": torch.__version__, "eval_seconds": time.perf_counter() - t_start,
           "cpu_s": time.process_time() - c_start}
    if keep:
        out["grid"] = res["images"]
    return out
