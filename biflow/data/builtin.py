"""Built-in datasets and the `prepare` entry point. Nothing here downloads anything.

    digits       sklearn's 1797 handwritten digits, 8x8x1, values 0..16 scaled to 0..255, 10 classes
    patches      random RGB crops (side data.image_size) of the photos bundled with scikit-image and
                 scikit-learn; label = index of the source photo
    imagefolder  a user's class-per-folder tree (data.source/<class>/<image>), center-cropped and
                 resized to data.image_size, RGB; class index = position of the sorted folder name
    shards       data.source is an already prepared directory (with train/ and test/); read as is

Splits are stratified by label, by data.test_fraction, deterministic given data.seed. Every split
goes through one streaming ShardWriter; an imagefolder tree is listed first (the split needs only the
labels), then decoded by data.workers processes DECODE_CHUNK images at a time, so memory stays bounded
(ImageNet does not fit in it); the imagefolder reader is biflow/data/imagefolder.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from biflow.config import DataConfig
from biflow.data.imagefolder import ImageFolder, imagefolder_source, tree_fingerprint
from biflow.data.parts import DataError
from biflow.data.shards import MANIFEST, ShardError, ShardSet, ShardWriter, read_manifest, read_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
BUILD_VERSION = 1  # bump when a builder's output changes, so prepared directories are rebuilt
PHOTOS = (  # (library, name): RGB photos that ship inside the wheels; the order fixes the labels
    ("skimage", "astronaut"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "retina"),
    ("skimage", "rocket"),
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
)




@dataclass
class Arrays:
    """A whole dataset in memory, before splitting."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def chunks(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        """The images of rows `idx`, in order: here one uint8 (len(idx), H, W, C) array."""
        yield self.images[idx]


# ----------------------------------------------------------------------------- split
def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split -> (train_idx, test_idx), each sorted, disjoint, together all of range(N).

    Per class, round(n_c * test_fraction) samples go to test, at least 1 and at most n_c - 1
    when n_c >= 2 (a single-sample class stays in train).
    """
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


# ---------------------------------------------------------------------------- digits
def digits_arrays(cfg: DataConfig) -> Arrays:
    """sklearn digits: (1797, 8, 8, 1) uint8, v -> round(v * 255 / 16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    return Arrays(images, d.target.astype(np.int64), [str(i) for i in range(10)])


# --------------------------------------------------------------------------- patches
def _load_photo(lib: str, name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3)."""
    if lib == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{lib}.{name}: expected uint8 RGB, got {img.dtype} {img.shape}")
    return img


def bundled_photos() -> list[tuple[str, np.ndarray]]:
    """[(name, uint8 (H, W, 3))] for the PHOTOS that load offline here; others are skipped with a warning."""
    out = []
    for lib, name in PHOTOS:
        try:
            out.append((name.removesuffix(".jpg"), _load_photo(lib, name)))
        except Exception as err:  # noqa: BLE001 - a missing optional photo must not break the others
            log.warning("patches: skipping photo %s.%s (%s)", lib, name, err)
    if not out:
        raise DataError("patches: none of the bundled photos could be loaded")
    return out


def patches_arrays(cfg: DataConfig) -> Arrays:
    """cfg.patches_per_image random (S, S, 3) crops per bundled photo, S = cfg.image_size."""
    size, rng = cfg.image_size, np.random.default_rng(cfg.seed)
    crops, labels, names = [], [], []
    for label, (name, img) in enumerate(bundled_photos()):
        h, w = img.shape[:2]
        if min(h, w) < size:  # upscale so the short side fits one crop
            scale = size / min(h, w)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            img = np.asarray(Image.fromarray(img).resize(new, Image.Resampling.BICUBIC))
            h, w = img.shape[:2]
        ys = rng.integers(0, h - size + 1, cfg.patches_per_image)
        xs = rng.integers(0, w - size + 1, cfg.patches_per_image)
        crops.extend(img[y : y + size, x : x + size] for y, x in zip(ys, xs))
        labels.extend([label] * cfg.patches_per_image)
        names.append(name)
    return Arrays(np.stack(crops), np.asarray(labels, np.int64), names)  # (N, S, S, 3)


# --------------------------------------------------------------------------- prepare
BUILDERS = {"digits": digits_arrays, "patches": patches_arrays, "imagefolder": imagefolder_source}
EXECUTION_ONLY = {"workers"}  # DataConfig fields that change how data is prepared, not what it is


def _settings(cfg: DataConfig) -> dict:
    """The config the prepared data depends on: all of it but the EXECUTION_ONLY fields."""
    return cfg.model_dump(exclude=EXECUTION_ONLY)


def data_recipe(cfg: DataConfig) -> dict:
    """What a prepared directory was built from; a directory is reused only if this matches."""
    recipe = {"builder_version": BUILD_VERSION, **_settings(cfg)}
    if cfg.name == "imagefolder" and cfg.source and Path(cfg.source).expanduser().is_dir():
        recipe["source_fingerprint"] = tree_fingerprint(Path(cfg.source).expanduser())
    return recipe


def _is_prepared(out_dir: Path, recipe: dict) -> bool:
    for split in SPLITS:
        try:
            manifest = read_manifest(out_dir / split)
        except ShardError:
            return False
        if manifest["meta"].get("recipe") != recipe:
            return False
        if not all((out_dir / split / f["name"]).is_file() for f in manifest["files"]):
            return False
    return True


def _shards_source(cfg: DataConfig) -> Path:
    if not cfg.source:
        raise DataError("data.source is required for data.name=shards (a prepared shard directory)")
    return Path(cfg.source).expanduser()


def _write_split(split_dir: Path, source: Arrays | ImageFolder, idx: np.ndarray, meta: dict,
                 rows_per_shard: int) -> None:
    """Stream the rows `idx` (N,) of `source` into one shard directory, a chunk of images at a time, in order."""
    writer = ShardWriter(split_dir, meta, source.image_shape, len(idx), rows_per_shard)
    done = 0
    for images in source.chunks(idx):  # uint8 (n, H, W, C)
        writer.add(images, source.labels[idx[done : done + len(images)]])
        done += len(images)
    writer.close()


def prepare(cfg: DataConfig, out_dir: str | Path) -> Path:
    """Build `out_dir/train/` and `out_dir/test/` shard dirs for `cfg`; returns the prepared root.

    Skips the work when both manifests exist and were built from the same recipe (config,
    builder version, and for imagefolder a fingerprint of the source tree). For `shards`,
    `cfg.source` is validated and returned; nothing is copied.
    """
    if cfg.name == "shards":
        root = _shards_source(cfg)
        for split in SPLITS:
            read_shards(root / split)
        return root
    out_dir = Path(out_dir)
    recipe = data_recipe(cfg)
    if _is_prepared(out_dir, recipe):
        log.info("data: %s already prepared (%s)", out_dir, cfg.name)
        return out_dir
    source = BUILDERS[cfg.name](cfg)
    train_idx, test_idx = split_indices(source.labels, cfg.test_fraction, cfg.seed)
    for split, idx in zip(SPLITS, (train_idx, test_idx)):
        meta = dict(
            name=cfg.name, split=split, num_classes=len(source.class_names), class_names=source.class_names,
            recipe=recipe,
        )
        _write_split(out_dir / split, source, idx, meta, cfg.rows_per_shard)
    log.info("data: prepared %s in %s (%d train, %d test)", cfg.name, out_dir, len(train_idx), len(test_idx))
    return out_dir


def default_data_root() -> Path:
    """Where `load_split(cfg, ...)` prepares data: $BIFLOW_DATA_DIR, else ~/.cache/biflow/data."""
    env = os.environ.get("BIFLOW_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "biflow" / "data"


def prepared_dir(cfg: DataConfig, root: str | Path | None = None) -> Path:
    """The cache directory for `cfg` under `root`: <root>/<name>-<12 hex of the config>."""
    key = hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(root or default_data_root()) / f"{cfg.name}-{key}"


def load_split(cfg_or_dir: DataConfig | str | Path, split: str, root: str | Path | None = None) -> ShardSet:
    """One split ("train" | "test") in memory.

    A path is a prepared root (holding train/ and test/) or a split directory itself. A DataConfig
    is prepared on first use under `prepared_dir(cfg, root)` (for `shards`: read from cfg.source).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(cfg_or_dir, DataConfig):
        cfg = cfg_or_dir
        base = _shards_source(cfg) if cfg.name == "shards" else prepare(cfg, prepared_dir(cfg, root))
        return read_shards(base / split)
    base = Path(cfg_or_dir).expanduser()
    if not (base / split).is_dir() and (base / MANIFEST).is_file():
        meta = read_manifest(base)["meta"]
        if meta.get("split") != split:
            raise ShardError(f"{base}: holds split {meta.get('split')!r}, asked for {split!r}")
        return read_shards(base)
    return read_shards(base / split)
