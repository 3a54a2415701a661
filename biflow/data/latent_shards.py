"""Latent shards: the VAE latents of an image shard directory, the training data of the paper-scale runs.

The storage format only: `biflow.latent.encode_shards` writes them (a frozen VAE over prepared image shards),
training reads them through `biflow.data.model_space` (`load_latent_split` + `shuffled_batches` in-process,
`latents_from_rows` for Ray Data batches on Ray Train workers).

Layout, like biflow.data.shards and written by the same PartWriter (one directory per split, each file and
the manifest written atomically, the manifest last as the completion marker), with its own columns:

    latent  binary  C*h*w little-endian elements of meta.dtype (float16 | float32), C-major (C, h, w) order
    label   int64   class index in [0, num_classes)

The Parquet schema metadata holds the split's metadata as JSON under `biflow` (identical in every file):

    {"kind": "latent", "name", "split", "num_classes", "class_names",
     "latent_shape": [C, h, w], "dtype": "float16" | "float32",
     "image_shape": [h, w, C],        the model-space sample shape in the data layer's (H, W, C) order,
                                      so geometry code (training.stages.with_geometry) reads both formats
     "source_image_shape": [H, W, 3], "source_hash": the image shards' content hash,
     "codec": {vae, subfolder, mode, seed, dtype, scaling_factor, shift_factor, weights_sha256, ...},
     "recipe": {...}}                 what the split was built from: a rerun with the same recipe does nothing

`manifest.json` = {"format": "biflow-latents", "version": 1, "meta": {the above + "count" and "stats"
(per-channel mean and std of the stored latents)}, "count", "files": [{name, rows, bytes, sha256}],
"content_hash"}; content_hash is the sha256 over the files' names and sha256s, as for image shards.

Latents are NOT in [-1, 1]: scaled SD-VAE latents have roughly unit variance, and the flow trains on them
as they are, with noise augmentation sigma = 0.3 (forward.noise_std; STARFlow's choice on latents).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from biflow.data.parts import (
    MANIFEST,
    LabelledSplit,
    PartWriter,
    ShardError,
    binary_chunks,
    binary_rows,
    check_labels,
    content_hash,
    dumps,
    load_manifest,
    read_table,
)
from biflow.data.transforms import shuffled_batches

FORMAT = "biflow-latents"
VERSION = 1
META_KEY = b"biflow"
SPLITS = ("train", "test")
SCHEMA = pa.schema([("latent", pa.binary()), ("label", pa.int64())])
NUMPY_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_MANIFEST_ONLY = ("count", "stats")  # meta entries known only at the end: in the manifest, not in the files


@dataclass(frozen=True)
class LatentSet(LabelledSplit):
    """One split of latents in memory."""

    latents: np.ndarray  # float16 | float32 (N, C, h, w), scaled latents
    labels: np.ndarray  # int64 (N,)
    meta: dict[str, Any] = field(default_factory=dict)  # split metadata (module docstring)
    content_hash: str = ""

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.latents.shape[1:]
        return int(c), int(h), int(w)


# ------------------------------------------------------------------------------ write
class LatentShardWriter(PartWriter):
    """Streams latent batches into Parquet parts of `rows_per_shard` rows; `close()` writes the manifest."""

    FORMAT = FORMAT
    VERSION = VERSION

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], rows_per_shard: int = 8192):
        self.shape = tuple(int(s) for s in meta["latent_shape"])  # (C, h, w)
        self.dtype = NUMPY_DTYPES[meta["dtype"]]
        row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        super().__init__(out_dir, SCHEMA, json.loads(dumps(meta)), row_bytes, rows_per_shard)
        self._sum = np.zeros(self.shape[0], np.float64)  # per channel, over the stored values
        self._sumsq = np.zeros(self.shape[0], np.float64)

    def add(self, latents: np.ndarray, labels: np.ndarray) -> None:
        """latents (n, C, h, w) float, labels (n,) int."""
        latents = np.asarray(latents)
        if latents.shape[1:] != self.shape:
            raise ValueError(f"latent batch {latents.shape}, expected (n, {', '.join(map(str, self.shape))})")
        labels = check_labels(labels, len(latents), int(self.meta["num_classes"]))
        stored = np.ascontiguousarray(latents, dtype=self.dtype)
        wide = stored.astype(np.float64)
        self._sum += wide.sum(axis=(0, 2, 3))
        self._sumsq += (wide**2).sum(axis=(0, 2, 3))
        self._append(stored, labels)

    def _table(self, values: np.ndarray, labels: np.ndarray) -> pa.Table:
        return pa.Table.from_arrays([binary_chunks(values, max(1, len(values))), pa.array(labels)], schema=self.schema)

    def manifest_meta(self) -> dict[str, Any]:
        """The parts' meta plus count and per-channel stats (mean, std) of the stored latents."""
        n = max(self.count * self.shape[1] * self.shape[2], 1)
        mean = self._sum / n
        std = np.sqrt(np.maximum(self._sumsq / n - mean**2, 0.0))
        return {**self.meta, "count": self.count, "stats": {"mean": mean.tolist(), "std": std.tolist()}}


# ------------------------------------------------------------------------------- read
def read_latent_manifest(split_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of one latent split directory (no file contents are read)."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: latent manifest missing (not encoded yet, or interrupted); run the encode step again")
    manifest = load_manifest(path, FORMAT, VERSION, ("latent_shape", "dtype", "num_classes"),
                             " (image shards are read with biflow.data.load_split)")
    if manifest["meta"]["dtype"] not in NUMPY_DTYPES:
        raise ShardError(f"{path}: unknown latent dtype {manifest['meta']['dtype']!r}")
    return manifest


def read_latent_shards(split_dir: str | Path) -> LatentSet:
    """Read and validate one latent split directory into memory (checksums, schema, shapes, labels)."""
    split_dir = Path(split_dir)
    manifest = read_latent_manifest(split_dir)
    meta = manifest["meta"]
    shape = tuple(int(s) for s in meta["latent_shape"])
    dtype = NUMPY_DTYPES[meta["dtype"]]
    row_bytes = int(np.prod(shape)) * dtype.itemsize
    file_meta = {k: v for k, v in meta.items() if k not in _MANIFEST_ONLY}
    latents, labels = [], []
    for entry in manifest["files"]:
        path = split_dir / entry["name"]
        table, digest = read_table(path)
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: content differs from {MANIFEST} (sha256 mismatch); encode again")
        if [(f.name, f.type) for f in table.schema] != [(f.name, f.type) for f in SCHEMA]:
            raise ShardError(f"{path}: schema {table.schema.names} is not a latent shard's {SCHEMA.names}")
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None or json.loads(raw) != file_meta:
            raise ShardError(f"{path}: metadata differs from {MANIFEST}")
        if table.num_rows != entry["rows"]:
            raise ShardError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        flat = binary_rows(path, table.column("latent"), row_bytes, "latent bytes", f"{shape} {meta['dtype']}")
        latents.append(flat.view(dtype).reshape(-1, *shape))
        labels.append(table.column("label").to_numpy().astype(np.int64))
    x = np.concatenate(latents)  # (N, C, h, w), a fresh, writable array
    y = np.concatenate(labels)
    if len(x) != manifest["count"]:
        raise ShardError(f"{split_dir}: {len(x)} rows, manifest says {manifest['count']}")
    if y.size and (y.min() < 0 or y.max() >= int(meta["num_classes"])):
        raise ShardError(f"{split_dir}: labels span [{y.min()}, {y.max()}], num_classes is {meta['num_classes']}")
    if content_hash(manifest["files"]) != manifest["content_hash"]:
        raise ShardError(f"{split_dir / MANIFEST}: content_hash does not match its file list")
    return LatentSet(latents=x, labels=y, meta=meta, content_hash=manifest["content_hash"])


def load_latent_split(root: str | Path, split: str) -> LatentSet:
    """One split ("train" | "test") of an encoded root (holding train/ and test/), or a split directory itself."""
    root = Path(root).expanduser()
    if (root / split / MANIFEST).is_file() or not (root / MANIFEST).is_file():
        return read_latent_shards(root / split)
    got = read_latent_manifest(root)["meta"].get("split")
    if got != split:
        raise ShardError(f"{root}: holds split {got!r}, asked for {split!r}")
    return read_latent_shards(root)


# ---------------------------------------------------------------------- training data
def latent_batches(latents: LatentSet, batch_size: int, seed: int = 0,
                   device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x float32 (B, C, h, w), y int64 (B,)) on `device`: the `batches` contract, for latents.

    The whole split moves to `device` once, in its storage dtype (ImageNet-256 as float16 latents is
    10.5 GB, so it fits on one GPU and no loader has to keep up); each epoch is a fresh permutation drawn
    from `seed`, the last incomplete batch is dropped (a split smaller than the batch is one batch).
    """
    return shuffled_batches(latents.latents, latents.labels, batch_size, seed, device)


def latents_from_rows(batch: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ray Data numpy batch of latent-shard rows -> (x float32 (B, C, h, w), y int64 (B,)).

    For Ray Train workers reading `ray.data.read_parquet(<latent split dir>)`; meta is the split's manifest meta.
    """
    shape, dtype = tuple(int(s) for s in meta["latent_shape"]), NUMPY_DTYPES[meta["dtype"]]
    x = np.frombuffer(b"".join(batch["latent"]), dtype).reshape(-1, *shape)
    return torch.from_numpy(x.astype(np.float32)), torch.tensor(batch["label"], dtype=torch.long)
