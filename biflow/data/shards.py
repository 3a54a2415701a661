"""Parquet image shards: the on-disk dataset format.

A shard directory holds `part-00000.parquet`, `part-00001.parquet`, ... and `manifest.json`.
Every Parquet file has one row per image with exactly these columns:

    image     binary  raw uint8 pixel bytes in HWC order; length == height * width * channels
    height    int32
    width     int32
    channels  int32
    label     int64   class index in [0, num_classes)

The Parquet schema metadata holds the dataset metadata as JSON under the key `biflow`,
identical in every file of a directory (extra keys are kept as given):

    {"name": str, "split": "train" | "test", "num_classes": int,
     "image_shape": [H, W, C], "class_names": [str, ...], "count": N (rows in the directory)}

`manifest.json` is the completion marker (like Hadoop's `_SUCCESS`) and is written last:

    {"format": "biflow-shards", "version": 1, "meta": {...}, "count": N,
     "files": [{"name": "part-00000.parquet", "rows": int, "bytes": int, "sha256": hex}, ...],
     "content_hash": hex}

`content_hash` is the sha256 over the files' names and sha256s (of their bytes), so it changes
whenever any shard's content does; later code keys caches on it. Each file and the manifest are
written atomically (temp file in the same directory, then `os.replace`). `ShardWriter` writes a
directory from batches, in bounded memory (`write_shards` is one whole split through it; latent
shards share its base, `PartWriter`, in biflow/data/parts.py). `read_shards` checks all of the
above and reports any problem as a one-line `ShardError` naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from biflow.data.parts import (MANIFEST, META_KEY, PART_GLOB, LabelledSplit, PartWriter, ShardError, binary_chunks,
                               binary_rows, check_labels, content_hash, dumps, load_manifest, read_table)

FORMAT = "biflow-shards"
VERSION = 1
SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("label", pa.int64()),
    ]
)
_ROW_GROUP_BYTES = 128 << 20  # image bytes per Parquet row group (bounds memory and 2 GiB binary offsets)
_REQUIRED_META = ("name", "split", "num_classes", "image_shape", "count")


@dataclass(frozen=True)
class ShardSet(LabelledSplit):
    """One split in memory."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    meta: dict[str, Any] = field(default_factory=dict)  # dataset metadata (see module docstring)
    content_hash: str = ""  # manifest content hash; "" for sets not read from disk

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)


# ------------------------------------------------------------------------------ write
def _image_meta(meta: dict[str, Any], image_shape: tuple[int, int, int], count: int) -> dict[str, Any]:
    """The stored metadata: `meta` as plain JSON, checked, with class_names, image_shape and count filled in."""
    for key in ("name", "split", "num_classes"):
        if key not in meta:
            raise ValueError(f"meta needs {key!r} (have {sorted(meta)})")
    num_classes = int(meta["num_classes"])
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    names = [str(c) for c in meta.get("class_names") or range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for num_classes={num_classes}")
    out = json.loads(dumps(meta))  # plain JSON types only
    out.update(num_classes=num_classes, class_names=names, image_shape=list(image_shape), count=count)
    return out


class ShardWriter(PartWriter):
    """Streams images uint8 (n, H, W, C) and labels (n,) into an image shard directory of `count` rows in all.

    `meta` needs name, split and num_classes; image_shape and count are filled in (every part stores
    the final count, so it is given up front and `close()` checks it).
    """

    FORMAT, VERSION = FORMAT, VERSION

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], image_shape: tuple[int, int, int], count: int,
                 rows_per_shard: int = 4096):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {tuple(image_shape)}")
        self.image_shape, self.expected = shape, int(count)
        super().__init__(out_dir, SCHEMA, _image_meta(meta, shape, self.expected), int(np.prod(shape)), rows_per_shard)
        self.row_group_size = max(1, min(self.rows_per_shard, _ROW_GROUP_BYTES // self.row_bytes))

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """images uint8 (n, H, W, C) of the writer's image_shape, labels integer (n,) in [0, num_classes)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be uint8 (n, {', '.join(map(str, self.image_shape))}), "
                             f"got {images.dtype} {images.shape}")
        labels = check_labels(labels, len(images), int(self.meta["num_classes"]))
        if self.count + len(images) > self.expected:
            raise ValueError(f"{self.out_dir}: {self.count + len(images)} rows added, count is {self.expected}")
        self._append(np.ascontiguousarray(images), labels)

    def _table(self, values: np.ndarray, labels: np.ndarray) -> pa.Table:
        sizes = [pa.array(np.full(len(labels), s, np.int32)) for s in self.image_shape]  # height, width, channels
        columns = [binary_chunks(values, self.row_group_size), *sizes, pa.array(labels)]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def close(self) -> dict[str, Any]:
        """Write the last part and the manifest; fewer rows than `count` is a ValueError (and no manifest)."""
        if self.count != self.expected:
            raise ValueError(f"{self.out_dir}: {self.count} rows added, count is {self.expected}")
        return super().close()


def write_shards(
    out_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, Any],
    rows_per_shard: int = 4096,
) -> list[Path]:
    """Write images uint8 (N, H, W, C) and labels int64 (N,) as Parquet shards plus a manifest (one ShardWriter).

    `meta` needs name, split and num_classes; image_shape and count are filled in. N == 0 writes one
    empty shard that still carries the schema.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    writer = ShardWriter(out_dir, meta, images.shape[1:], len(images), rows_per_shard)
    writer.add(images, labels)
    return [writer.out_dir / entry["name"] for entry in writer.close()["files"]]


# ------------------------------------------------------------------------------- read
def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a shard directory (no file contents are read)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir() or (not path.exists() and not any(shard_dir.glob(PART_GLOB))):
        raise ShardError(f"{shard_dir}: no shards found; run `biflow prepare` or check data.source")
    if not path.is_file():
        raise ShardError(f"{path}: manifest missing (interrupted write?); run `biflow prepare` again")
    return load_manifest(path, FORMAT, VERSION, _REQUIRED_META)


def _file_meta(path: Path, table: pa.Table) -> dict[str, Any]:
    got = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in SCHEMA]
    if got != want:
        raise ShardError(f"{path}: schema {[f'{n}:{t}' for n, t in got]} != expected {[f'{n}:{t}' for n, t in want]}")
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ShardError(f"{path}: Parquet schema metadata lacks key {META_KEY.decode()!r}")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: metadata {META_KEY.decode()!r} is not JSON ({err})") from None
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ShardError(f"{path}: metadata lacks {', '.join(missing)}")
    return meta


def read_shards(shard_dir: str | Path) -> ShardSet:
    """Read and validate a shard directory into memory: images uint8 (N, H, W, C), labels int64 (N,)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    meta = manifest["meta"]
    shape = tuple(int(s) for s in meta["image_shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise ShardError(f"{shard_dir / MANIFEST}: bad image_shape {meta['image_shape']}")
    num_classes, row_bytes = int(meta["num_classes"]), int(np.prod(shape))
    images, labels = [], []
    for entry in manifest["files"]:
        path = shard_dir / entry["name"]
        table, digest = read_table(path)
        fmeta = _file_meta(path, table)
        fshape = tuple(int(s) for s in fmeta["image_shape"])
        if fshape != shape:
            raise ShardError(f"{path}: image shape {fshape} differs from {shape} of the other shards")
        if fmeta != meta:
            raise ShardError(f"{path}: metadata differs from {MANIFEST}")
        if table.num_rows != entry["rows"]:
            raise ShardError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        if any(table.column(k).null_count for k in table.column_names):
            raise ShardError(f"{path}: null values")
        for key, want in zip(("height", "width", "channels"), shape):
            col = table.column(key).to_numpy()
            if col.size and (col != want).any():
                raise ShardError(f"{path}: row {key} {int(col[col != want][0])} != image_shape {shape}")
        lab = table.column("label").to_numpy().astype(np.int64)
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ShardError(f"{path}: labels span [{lab.min()}, {lab.max()}], num_classes is {num_classes}")
        flat = binary_rows(path, table.column("image"), row_bytes, "image bytes", "h*w*c")
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: content differs from {MANIFEST} (sha256 mismatch); re-run `biflow prepare`")
        images.append(flat)
        labels.append(lab)
    x = np.concatenate(images).reshape(-1, *shape)  # (N, H, W, C), a fresh writable array
    y = np.concatenate(labels)  # (N,)
    if len(x) != manifest["count"] or len(x) != meta["count"]:
        raise ShardError(f"{shard_dir}: {len(x)} rows, manifest says {manifest['count']}")
    if content_hash(manifest["files"]) != manifest["content_hash"]:
        raise ShardError(f"{shard_dir / MANIFEST}: content_hash does not match its file list")
    return ShardSet(images=x, labels=y, meta=meta, content_hash=manifest["content_hash"])
