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
shards share its base, `PartWriter`). `read_shards` checks all of the above and reports any
problem as a one-line `ShardError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import mmap
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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


class LabelledSplit:
    """What image and latent splits share: labels int64 (N,) and meta holding num_classes."""

    labels: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])


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


def check_labels(labels: np.ndarray, rows: int, num_classes: int) -> np.ndarray:
    """Integer labels (rows,) in [0, num_classes) -> int64 (rows,); anything else is a ValueError."""
    labels = np.asarray(labels)
    if labels.shape != (rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer ({rows},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], need [0, {num_classes})")
    return labels.astype(np.int64)


class PartWriter:
    """Streams rows into `part-NNNNN.parquet` files of `rows_per_shard` rows; `close()` writes the manifest.

    The shared write side of image and latent shards, whose rows are a fixed-size binary value and a
    label. Subclasses validate their batches, pass them to `_append` and turn the rows of one part into
    a table. Nothing on disk changes until the first part is written; then the old manifest goes first,
    so an interrupted rewrite reads as incomplete rather than as a mix; `close()` removes stale parts of
    an earlier write and writes the manifest last. Added arrays are buffered by reference until written.
    """

    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = VERSION

    def __init__(self, out_dir: str | Path, schema: pa.Schema, meta: dict[str, Any], row_bytes: int,
                 rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir, self.rows_per_shard, self.row_bytes = Path(out_dir), int(rows_per_shard), int(row_bytes)
        self.meta = meta  # plain JSON, stored in every part's schema metadata
        self.schema = schema.with_metadata({META_KEY: _dumps(meta).encode()})
        self.row_group_size: int | None = None  # Parquet rows per row group; None: pyarrow's default
        self._pending: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (values, labels) added, not yet written
        self._buffered = 0
        self.count = 0  # rows added
        self.entries: list[dict[str, Any]] = []  # manifest "files", one per written part

    def _table(self, values: np.ndarray, labels: np.ndarray) -> pa.Table:
        """One part's rows, values uint8 (rows, row_bytes) and labels int64 (rows,) -> its table (self.schema)."""
        raise NotImplementedError

    def manifest_meta(self) -> dict[str, Any]:
        """The manifest's meta (the parts' meta, plus what is known only at the end)."""
        return self.meta

    def _append(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Buffer rows: values, any contiguous array of n * row_bytes bytes; labels int64 (n,)."""
        rows = len(labels)
        if rows:
            self._pending.append((values.view(np.uint8).reshape(rows, self.row_bytes), labels))
            self._buffered += rows
            self.count += rows
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _take(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Pop the first `rows` buffered rows -> (values uint8 (rows, row_bytes), labels int64 (rows,))."""
        values, labels = [np.zeros((0, self.row_bytes), np.uint8)], [np.zeros(0, np.int64)]  # dtypes for rows == 0
        while rows:
            head_values, head_labels = self._pending.popleft()
            n = min(rows, len(head_labels))
            if n < len(head_labels):
                self._pending.appendleft((head_values[n:], head_labels[n:]))
            values.append(head_values[:n])
            labels.append(head_labels[:n])
            rows -= n
        return np.concatenate(values), np.concatenate(labels)

    def _flush(self, rows: int) -> None:
        if not self.entries:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / MANIFEST).unlink(missing_ok=True)
        table = self._table(*self._take(rows))
        self._buffered -= rows
        path = self.out_dir / f"part-{len(self.entries):05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=self.row_group_size)
            with open(tmp, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:  # not in RAM
                entry = dict(name=path.name, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.entries.append(entry)

    def close(self) -> dict[str, Any]:
        """Write the buffered rows (an empty split still gets one part carrying the schema), then the manifest."""
        if self._buffered or not self.entries:
            self._flush(self._buffered)
        keep = {e["name"] for e in self.entries}
        for stale in self.out_dir.glob(PART_GLOB):
            if stale.name not in keep:
                stale.unlink()
        manifest = dict(format=self.FORMAT, version=self.VERSION, meta=self.manifest_meta(), count=self.count,
                        files=self.entries, content_hash=_content_hash(self.entries))
        atomic_write_bytes(self.out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        return manifest


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
    out = json.loads(_dumps(meta))  # plain JSON types only
    out.update(num_classes=num_classes, class_names=names, image_shape=list(image_shape), count=count)
    return out


class ShardWriter(PartWriter):
    """Streams images uint8 (n, H, W, C) and labels (n,) into an image shard directory of `count` rows in all.

    `meta` needs name, split and num_classes; image_shape and count are filled in (every part stores
    the final count, so it is given up front and `close()` checks it).
    """

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
        columns = [_binary_chunks(values, self.row_group_size), *sizes, pa.array(labels)]
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
    return load_manifest(path, FORMAT, VERSION, _REQUIRED_META)


def load_manifest(path: Path, fmt: str, version: int, meta_keys: tuple[str, ...], hint: str = "") -> dict[str, Any]:
    """Parse one manifest.json and check its format, version, keys (and `meta_keys` of meta) and file list."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise ShardError(f"{path}: not a {fmt} manifest{hint}")
    if manifest.get("version") != version:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, this code reads {version}")
    missing = [k for k in ("meta", "count", "files", "content_hash") if k not in manifest]
    missing += [f"meta.{k}" for k in meta_keys if k not in manifest.get("meta", {})]
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


def _binary_rows(path: Path, column: pa.ChunkedArray, row_bytes: int, what: str, want: str) -> np.ndarray:
    """Binary column of fixed-size rows -> (rows, row_bytes) uint8, checking every row's byte length."""
    parts = []
    for arr in column.chunks:
        if len(arr) == 0:
            continue
        bufs = arr.buffers()  # [validity, int32 offsets, data]
        offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths != row_bytes)
        if bad.size:
            raise ShardError(f"{path}: {what} {int(lengths[bad[0]])} != {want} = {row_bytes} ({bad.size} rows)")
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
        flat = _binary_rows(path, table.column("image"), row_bytes, "image bytes", "h*w*c")
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
