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
written atomically (temp file in the same directory, then `os.replace`). `read_shards` checks
all of the above and reports any problem as a one-line `ShardError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biflow.atomic import atomic_path, atomic_write_bytes
from biflow.errors import UserError

FORMAT = "biflow-shards"
VERSION = 1
META_KEY = b"biflow"
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"
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


class ShardError(UserError, ValueError):
    """A missing, incomplete or corrupt shard directory, reported as one line."""


@dataclass(frozen=True)
class ShardSet:
    """One split in memory."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    meta: dict[str, Any] = field(default_factory=dict)  # dataset metadata (see module docstring)
    content_hash: str = ""  # manifest content hash; "" for sets not read from disk

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)


# ------------------------------------------------------------------------------ write
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _binary_chunks(flat: np.ndarray, rows_per_chunk: int) -> pa.ChunkedArray:
    """(n, L) uint8 -> binary column, built zero-copy from buffers, chunked to stay under 2 GiB."""
    n, length = flat.shape
    chunks = []
    for lo in range(0, max(n, 1), rows_per_chunk):
        part = np.ascontiguousarray(flat[lo : lo + rows_per_chunk])
        offsets = (np.arange(part.shape[0] + 1, dtype=np.int64) * length).astype(np.int32)
        chunks.append(
            pa.Array.from_buffers(pa.binary(), part.shape[0], [None, pa.py_buffer(offsets), pa.py_buffer(part)])
        )
    return pa.chunked_array(chunks, type=pa.binary())


def _normalise_meta(meta: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    for key in ("name", "split", "num_classes"):
        if key not in meta:
            raise ValueError(f"write_shards: meta needs {key!r} (have {sorted(meta)})")
    num_classes = int(meta["num_classes"])
    if num_classes < 1:
        raise ValueError(f"write_shards: num_classes must be >= 1, got {num_classes}")
    names = [str(c) for c in meta.get("class_names") or range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"write_shards: {len(names)} class_names for num_classes={num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"write_shards: labels span [{labels.min()}, {labels.max()}], need [0, {num_classes})")
    out = json.loads(_dumps(meta))  # plain JSON types only
    out.update(num_classes=num_classes, class_names=names, image_shape=list(images.shape[1:]), count=len(images))
    return out


def write_shards(
    out_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, Any],
    rows_per_shard: int = 4096,
) -> list[Path]:
    """Write images uint8 (N, H, W, C) and labels int64 (N,) as Parquet shards plus a manifest.

    `meta` needs name, split and num_classes; image_shape and count are filled in. Any previous
    manifest is removed first and stale part files after, so an interrupted rewrite reads as
    incomplete rather than as a mix. N == 0 writes one empty shard that still carries the schema.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"write_shards: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"write_shards: labels must be integer ({len(images)},), got {labels.dtype} {labels.shape}")
    if rows_per_shard < 1:
        raise ValueError(f"write_shards: rows_per_shard must be >= 1, got {rows_per_shard}")
    labels = labels.astype(np.int64)
    meta = _normalise_meta(meta, images, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)

    n, (h, w, c) = len(images), images.shape[1:]
    row_bytes = max(h * w * c, 1)
    flat = images.reshape(n, h * w * c)  # (N, H*W*C)
    schema = SCHEMA.with_metadata({META_KEY: _dumps(meta).encode()})
    rows_per_group = max(1, min(rows_per_shard, _ROW_GROUP_BYTES // row_bytes))
    paths, entries = [], []
    for idx, lo in enumerate(range(0, max(n, 1), rows_per_shard)):
        hi = min(lo + rows_per_shard, n)
        rows = hi - lo
        table = pa.Table.from_arrays(
            [
                _binary_chunks(flat[lo:hi], rows_per_group),
                pa.array(np.full(rows, h, np.int32)),
                pa.array(np.full(rows, w, np.int32)),
                pa.array(np.full(rows, c, np.int32)),
                pa.array(labels[lo:hi]),
            ],
            schema=schema,
        )
        path = out_dir / f"part-{idx:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=rows_per_group)
            data = tmp.read_bytes()
        paths.append(path)
        entries.append(dict(name=path.name, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))

    keep = {p.name for p in paths}
    for stale in out_dir.glob(PART_GLOB):
        if stale.name not in keep:
            stale.unlink()
    manifest = dict(
        format=FORMAT, version=VERSION, meta=meta, count=n, files=entries, content_hash=_content_hash(entries)
    )
    atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return paths


def _content_hash(entries: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e['name']} {e['sha256']}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------- read
def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a shard directory (no file contents are read)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir() or (not path.exists() and not any(shard_dir.glob(PART_GLOB))):
        raise ShardError(f"{shard_dir}: no shards found; run `biflow prepare` or check data.source")
    if not path.is_file():
        raise ShardError(f"{path}: manifest missing (interrupted write?); run `biflow prepare` again")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in ("meta", "count", "files", "content_hash") if k not in manifest]
    missing += [f"meta.{k}" for k in _REQUIRED_META if k not in manifest.get("meta", {})]
    if missing:
        raise ShardError(f"{path}: manifest lacks {', '.join(missing)}")
    if not manifest["files"]:
        raise ShardError(f"{path}: manifest lists no files")
    return manifest


def _read_table(path: Path) -> tuple[pa.Table, str]:
    """One Parquet file -> (table, sha256 of its bytes); any I/O or format failure is a ShardError."""
    try:
        data = path.read_bytes()
        table = pq.read_table(pa.BufferReader(data))
    except FileNotFoundError:
        raise ShardError(f"{path}: listed in {MANIFEST} but missing") from None
    except (pa.ArrowException, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ShardError(f"{path}: corrupt or truncated Parquet file ({first})") from None
    return table, hashlib.sha256(data).hexdigest()


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


def _image_bytes(path: Path, column: pa.ChunkedArray, row_bytes: int) -> np.ndarray:
    """Binary column -> (rows, row_bytes) uint8, checking every row's byte length."""
    parts = []
    for arr in column.chunks:
        if len(arr) == 0:
            continue
        bufs = arr.buffers()  # [validity, int32 offsets, data]
        offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths != row_bytes)
        if bad.size:
            raise ShardError(f"{path}: image bytes {int(lengths[bad[0]])} != h*w*c = {row_bytes} ({bad.size} rows)")
        data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        parts.append(data.reshape(len(arr), row_bytes))
    return np.concatenate(parts) if parts else np.zeros((0, row_bytes), np.uint8)


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
        table, digest = _read_table(path)
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
        flat = _image_bytes(path, table.column("image"), row_bytes)
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: content differs from {MANIFEST} (sha256 mismatch); re-run `biflow prepare`")
        images.append(flat)
        labels.append(lab)
    x = np.concatenate(images).reshape(-1, *shape)  # (N, H, W, C), a fresh writable array
    y = np.concatenate(labels)  # (N,)
    if len(x) != manifest["count"] or len(x) != meta["count"]:
        raise ShardError(f"{shard_dir}: {len(x)} rows, manifest says {manifest['count']}")
    if _content_hash(manifest["files"]) != manifest["content_hash"]:
        raise ShardError(f"{shard_dir / MANIFEST}: content_hash does not match its file list")
    return ShardSet(images=x, labels=y, meta=meta, content_hash=manifest["content_hash"])
