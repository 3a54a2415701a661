"""Parquet part files with a manifest: what image shards (biflow.data.shards) and latent shards
(biflow.data.latent_shards) share.

A split directory holds `part-00000.parquet`, ... (one fixed-size binary value and a label per row,
the split's metadata as JSON under the schema metadata key `biflow`) and `manifest.json`, written last:
{"format", "version", "meta", "count", "files": [{name, rows, bytes, sha256}], "content_hash"}.
`PartWriter` streams rows into parts atomically; `load_manifest`, `read_table` and `binary_rows` are
the checked read side. Every problem is a one-line `ShardError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import mmap
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biflow.atomic import atomic_path, atomic_write_bytes
from biflow.errors import UserError

META_KEY = b"biflow"
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"


class DataError(UserError, ValueError):
    """A problem with a dataset's source (missing folder, unreadable image, ...), as one line."""


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



def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def binary_chunks(flat: np.ndarray, rows_per_chunk: int) -> pa.ChunkedArray:
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

    FORMAT: ClassVar[str]  # the manifest's "format" and "version": set by each shard kind
    VERSION: ClassVar[int]

    def __init__(self, out_dir: str | Path, schema: pa.Schema, meta: dict[str, Any], row_bytes: int,
                 rows_per_shard: int):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir, self.rows_per_shard, self.row_bytes = Path(out_dir), int(rows_per_shard), int(row_bytes)
        self.meta = meta  # plain JSON, stored in every part's schema metadata
        self.schema = schema.with_metadata({META_KEY: dumps(meta).encode()})
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
                        files=self.entries, content_hash=content_hash(self.entries))
        atomic_write_bytes(self.out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        return manifest


def content_hash(entries: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e['name']} {e['sha256']}\n".encode())
    return h.hexdigest()



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


def read_table(path: Path) -> tuple[pa.Table, str]:
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


def binary_rows(path: Path, column: pa.ChunkedArray, row_bytes: int, what: str, want: str) -> np.ndarray:
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
