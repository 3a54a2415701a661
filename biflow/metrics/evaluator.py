"""A small CNN trained on the dataset itself: fast Fréchet distance (`fd_evaluator`) and class accuracy.

Inception costs ~0.5 s per image on a CPU and was trained on 299 px ImageNet photos, not 8 px
digits. This evaluator trains in seconds on the training split, and gives
  - penultimate features (128-d): their Fréchet distance is reported as `fd_evaluator`, a proxy
    that ranks models on one dataset; it is never comparable with FID or across datasets;
  - class predictions: the accuracy of class-conditional samples (does a "3" look like a 3?).
Datasets without at least two classes train it on rotation prediction (0/90/180/270 degrees)
instead, which still gives useful features but no class accuracy.

The trained weights are cached at `<cache_dir>/evaluator/<key>.pt`, key = sha256 of the training
data's content hash, the architecture and the training recipe; written atomically, loaded with
`weights_only=True`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from biflow.atomic import atomic_path
from biflow.metrics._io import MetricError, array_hash, as_uint8_nhwc, digest, to_model_space

FORMAT = "biflow-evaluator-v1"


@dataclass(frozen=True)
class EvaluatorArch:
    """Geometry and task; sizes follow the image side (one conv stage per halving down to 4 px)."""

    in_channels: int
    image_size: int
    num_outputs: int  # classes, or 4 rotations
    task: str = "classes"  # "classes" | "rotation"
    base_width: int = 0  # channels of the first stage, doubling per stage up to 128; 0: 256 // side in [8, 32]
    feat_dim: int = 128  # penultimate width = feature dimension
    version: str = "cnn-v1"  # bump when the module below changes

    def width(self, stage: int) -> int:
        """Channels of conv stage `stage`. The default base keeps the cost per image about constant
        over sizes (side^2 * width^2 is the same at 8 px with 32 channels and at 32 px with 8)."""
        base = self.base_width or min(32, max(8, 256 // self.image_size))
        return min(128, base * 2**stage)


@dataclass(frozen=True)
class Recipe:
    """Training settings (part of the cache key). Defaults: >= 95% on digits in a few CPU seconds."""

    epochs: int = 15  # digits: 180 steps, 97-99% test accuracy
    max_steps: int = 1000  # cap for large datasets (a step costs ~30 ms at 8 px, ~130 ms at 32 px, ~550 ms at 64 px on one CPU core)
    batch_size: int = 128
    lr: float = 5e-3  # one-cycle peak
    weight_decay: float = 5e-4
    shift_frac: float = 0.125  # random translation up to this fraction of the side (at least 1 px)
    seed: int = 0


class EvaluatorCNN(nn.Module):
    """(N, C, H, W) in [-1, 1] -> logits (N, num_outputs); `features` gives the penultimate layer."""

    def __init__(self, arch: EvaluatorArch):
        super().__init__()
        pools = min(4, max(0, int(math.floor(math.log2(arch.image_size / 4)))))  # 8 px: 1, 16: 2, 32: 3, 64: 4
        layers, c = [], arch.in_channels
        for i in range(max(1, pools)):
            w = arch.width(i)
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < pools:
                layers.append(nn.MaxPool2d(2))
            c = w
        w = arch.width(max(1, pools))
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2)]
        self.body = nn.Sequential(*layers)  # (N, w, 2, 2)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * w, arch.feat_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(arch.feat_dim, arch.num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.body(x))  # (N, feat_dim): the input of the classifier layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to +-max_shift px (edge pixels repeated)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (N, W)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def _rotations(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randint(0, 4, (x.shape[0],), generator=gen)
    out = x.clone()
    for r in range(1, 4):
        sel = (k == r).to(x.device)
        out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out, k.to(x.device)


class Evaluator:
    """FeatureNet + classifier around a trained EvaluatorCNN."""

    name = "evaluator"
    metric_name = "fd_evaluator"
    has_logits = True  # dataset-class logits (for class accuracy; not an Inception Score)

    def __init__(self, model: EvaluatorCNN, arch: EvaluatorArch, key: str, info: dict, device: str | torch.device = "cpu"):
        self.model, self.arch, self.key, self.info = model.eval(), arch, key, info
        self.device = torch.device(device)
        self.dim = arch.feat_dim
        self.id = f"evaluator:{key[:24]}"
        self.classifies = arch.task == "classes"

    def _run(self, images, batch_size: int, fn) -> np.ndarray:
        images = as_uint8_nhwc(images)
        want = (self.arch.image_size, self.arch.image_size, self.arch.in_channels)
        if images.shape[1:] != want:
            raise MetricError(f"evaluator was trained on {want} images, got {images.shape[1:]}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                out.append(fn(to_model_space(images[start : start + batch_size], self.device)).double().cpu().numpy())
        return np.concatenate(out)

    def features(self, images, batch_size: int = 512) -> np.ndarray:
        return self._run(images, batch_size, self.model.features)

    def logits(self, images, batch_size: int = 512) -> np.ndarray:
        return self._run(images, batch_size, self.model)

    def features_and_logits(self, images, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        def both(x: torch.Tensor) -> torch.Tensor:
            f = self.model.features(x)
            return torch.cat([f, self.model.head(f)], dim=1)

        out = self._run(images, batch_size, both)
        return out[:, : self.dim], out[:, self.dim :]

    def predict(self, images, batch_size: int = 512) -> np.ndarray:
        if not self.classifies:
            raise MetricError("this evaluator was trained without class labels (rotation task): no class predictions")
        return self.logits(images, batch_size).argmax(axis=1)

    def accuracy(self, images, labels, batch_size: int = 512) -> float:
        return float((self.predict(images, batch_size) == np.asarray(labels)).mean())


def evaluator_key(content_hash: str, arch: EvaluatorArch, recipe: Recipe) -> str:
    return digest(FORMAT, content_hash, asdict(arch), asdict(recipe))


def _arch_for(images: np.ndarray, labels: np.ndarray | None) -> EvaluatorArch:
    n, h, w, c = images.shape
    if h != w:
        raise MetricError(f"evaluator expects square images, got {h}x{w}")
    if labels is not None and len(np.unique(labels)) >= 2:
        if labels.shape != (n,) or labels.min() < 0:
            raise MetricError(f"labels must be (N,) non-negative class indices, got shape {labels.shape}")
        return EvaluatorArch(in_channels=c, image_size=h, num_outputs=int(labels.max()) + 1, task="classes")
    return EvaluatorArch(in_channels=c, image_size=h, num_outputs=4, task="rotation")


def train_evaluator(images, labels=None, *, arch: EvaluatorArch | None = None, recipe: Recipe = Recipe(),
                    device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> tuple[EvaluatorCNN, dict]:
    """Train on uint8 images (N, H, W, C) and labels (N,) (or none: rotation task). Returns (model, info)."""
    images = as_uint8_nhwc(images)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    arch = arch or _arch_for(images, labels)
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and arch.image_size <= 16:
        # Convolutions on <= 16 px images are too small to split across threads: on a busy 2-core
        # machine 2 threads measured 7-9x slower per step than 1 (oversubscription); 1 thread: ~20-30 ms/step.
        torch.set_num_threads(1)
    try:
        return _train(images, labels, arch, recipe, device, log)
    finally:
        torch.set_num_threads(threads)


def _train(images, labels, arch: EvaluatorArch, recipe: Recipe, device: torch.device, log) -> tuple[EvaluatorCNN, dict]:
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = EvaluatorCNN(arch).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    x_all = to_model_space(images, device)
    y_all = torch.from_numpy(labels).to(device) if arch.task == "classes" else None
    n = len(x_all)
    steps = min(recipe.max_steps, recipe.epochs * math.ceil(n / recipe.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15)
    shift = max(1, round(recipe.shift_frac * arch.image_size))
    model.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + recipe.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + recipe.batch_size].to(device)
        pos += recipe.batch_size
        x = random_shift(x_all[idx], shift, gen)
        if arch.task == "classes":
            y = y_all[idx]
        else:
            x, y = _rotations(x, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"evaluator: step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    info = {"task": arch.task, "num_train": int(n), "steps": int(steps), "train_seconds": time.perf_counter() - t0,
            "final_loss": float(loss.item())}
    return model, info


def load_or_train_evaluator(images, labels=None, *, content_hash: str | None = None, cache_dir: str | Path | None = None,
                            recipe: Recipe = Recipe(), device: str | torch.device = "cpu",
                            log: Callable[[str], None] | None = None) -> Evaluator:
    """The evaluator for this training data: from `<cache_dir>/evaluator/<key>.pt` if present, else trained and saved."""
    images = as_uint8_nhwc(images)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    arch = _arch_for(images, labels)
    content_hash = content_hash or array_hash(images, labels)
    key = evaluator_key(content_hash, arch, recipe)
    path = Path(cache_dir) / "evaluator" / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location=device, weights_only=True)
            if blob.get("format") != FORMAT or blob.get("key") != key:
                raise ValueError("format or key mismatch")
            model = EvaluatorCNN(arch).to(device)
            model.load_state_dict(blob["state_dict"])
            return Evaluator(model, arch, key, {**blob["info"], "from_cache": True, "path": str(path)}, device)
        except Exception as err:  # unreadable cache entry: retrain and overwrite it
            if log is not None:
                log(f"evaluator: ignoring unreadable cache file {path} ({type(err).__name__}); retraining")
    model, info = train_evaluator(images, labels, arch=arch, recipe=recipe, device=device, log=log)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "key": key, "content_hash": content_hash, "arch": asdict(arch),
                        "recipe": asdict(recipe), "info": info,
                        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, tmp)
    return Evaluator(model, arch, key, {**info, "from_cache": False, "path": str(path) if path else None}, device)
