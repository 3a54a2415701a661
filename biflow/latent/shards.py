"""Latent shards: the VAE latents of an image shard directory, the training data of the paper-scale runs.

`encode_shards` turns prepared image shards (biflow.data: train/ and test/) into latent shards with a
frozen VAE (biflow.latent.vae), through Ray Data batch inference (an actor pool; one GPU per actor with
use_gpu) or in-process. Training reads them with `load_latent_split` + `latent_batches` (in-process) or
`latents_from_rows` (Ray Data batches on Ray Train workers).

Layout, like biflow.data.shards and written by the same PartWriter (one directory per split, each file and
the manifest written atomically, the manifest last as the completion marker), with its own columns:

    latent  binary  C*h*w little-endian elements of meta.dtype (float16 | float32), C-major (C, h, w) order
    label   int64   class index in [0, num_classes)

The Parquet schema metadata holds the split's metadata as JSON under `biflow` (identical in every file):

    {"kind": "latent", "name", "split", "num_classes", "class_names",
     "latent_shape": [C, h, w], "dtype": "float16" | "float32",
     "image_shape": [h, w, C],        the model-space sample shape in the data layer's (H, W, C) order,
                                      so geometry code (training.forward.with_geometry) reads both formats
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

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from biflow.config import LatentConfig
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
from biflow.latent.vae import LatentCodec, _as_config

log = logging.getLogger(__name__)

FORMAT = "biflow-latents"
VERSION = 1
ENCODER_VERSION = 1  # bump when the encoding of a batch changes, so latent shards are rebuilt
META_KEY = b"biflow"
SPLITS = ("train", "test")
SCHEMA = pa.schema([("latent", pa.binary()), ("label", pa.int64())])
_NUMPY = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
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
        self.dtype = _NUMPY[meta["dtype"]]
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
    if manifest["meta"]["dtype"] not in _NUMPY:
        raise ShardError(f"{path}: unknown latent dtype {manifest['meta']['dtype']!r}")
    return manifest


def read_latent_shards(split_dir: str | Path) -> LatentSet:
    """Read and validate one latent split directory into memory (checksums, schema, shapes, labels)."""
    split_dir = Path(split_dir)
    manifest = read_latent_manifest(split_dir)
    meta = manifest["meta"]
    shape = tuple(int(s) for s in meta["latent_shape"])
    dtype = _NUMPY[meta["dtype"]]
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
    shape, dtype = tuple(int(s) for s in meta["latent_shape"]), _NUMPY[meta["dtype"]]
    x = np.frombuffer(b"".join(batch["latent"]), dtype).reshape(-1, *shape)
    return torch.from_numpy(x.astype(np.float32)), torch.tensor(batch["label"], dtype=torch.long)


# ---------------------------------------------------------------------------- encoding
def content_noise(image: np.ndarray, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, I) float32 noise of `shape` seeded by (seed, the image's bytes): the same on every machine, batch and order."""
    words = np.frombuffer(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()[:16], np.uint32)
    return np.random.default_rng([seed, *words.tolist()]).standard_normal(shape, dtype=np.float32)


@torch.no_grad()
def encode_batch(codec: LatentCodec, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> float32 latents (B, C, h, w); mode 'sample' draws content-seeded noise."""
    noise = None
    if codec.mode == "sample":
        shape = codec.latent_shape(images.shape[1], images.shape[2])
        noise = torch.from_numpy(np.stack([content_noise(img, seed, shape) for img in images]))
    return codec.encode(images, noise=noise).cpu().numpy()


class _EncodeActor:
    """Ray Data callable class: one VAE per actor (on its GPU with use_gpu), image rows -> latent rows."""

    def __init__(self, spec: dict[str, Any], image_shape: tuple[int, int, int], device: str, threads: int):
        torch.set_num_threads(max(1, threads))
        self.cfg = LatentConfig(**spec)
        self.codec = LatentCodec.load(self.cfg, device)
        self.image_shape = image_shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.frombuffer(b"".join(batch["image"]), np.uint8).reshape(-1, *self.image_shape)  # (B, H, W, C)
        latents = encode_batch(self.codec, images, self.cfg.seed).astype(_NUMPY[self.cfg.storage])
        return {"latent": latents, "label": np.asarray(batch["label"], np.int64), "path": batch["path"]}


def _encode_in_process(src: Path, writer: LatentShardWriter, codec: LatentCodec, cfg: LatentConfig, batch_size: int,
                       bar) -> None:
    from biflow.data import read_shards

    shards = read_shards(src)  # checks every file's sha256 against the manifest
    for lo in range(0, len(shards), batch_size):
        writer.add(encode_batch(codec, shards.images[lo : lo + batch_size], cfg.seed), shards.labels[lo : lo + batch_size])
        bar.update(len(shards.labels[lo : lo + batch_size]))


def _encode_on_ray(files: dict[str, LatentShardWriter], cfg: LatentConfig, image_shape: tuple[int, int, int],
                   batch_size: int, use_gpu: bool, workers: int, num_cpus: float, bar) -> None:
    """One Ray Data pass over every file (all splits: one actor pool); each row goes to its file's writer, in order."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False  # rows come back in file order
    try:
        ds = ray.data.read_parquet(list(files), include_paths=True).select_columns(["image", "label", "path"])
        ds = ds.map_batches(_EncodeActor, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=1 if use_gpu else 0, num_cpus=num_cpus,
                            fn_constructor_kwargs=dict(spec=cfg.model_dump(), image_shape=image_shape,
                                                       device="cuda" if use_gpu else "cpu", threads=int(max(1, num_cpus))))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            paths = np.asarray(batch["path"]).astype(str)
            for path in dict.fromkeys(paths):  # the files of this batch, in order
                rows = paths == path
                files[path].add(batch["latent"][rows], batch["label"][rows])
            bar.update(len(paths))
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def encode_shards(
    src_dir: str | Path,
    out_dir: str | Path,
    codec: LatentConfig | str | dict,
    batch_size: int = 64,
    use_gpu: bool = False,
    *,
    use_ray: bool | None = None,
    workers: int = 1,
    num_cpus: float = 1.0,
    rows_per_shard: int = 8192,
) -> Path:
    """Encode image shards into latent shards; returns `out_dir` (holding train/ and test/, like `src_dir`).

    src_dir: a prepared root with train/ and test/ image shards (biflow.data.prepare), or one split directory
        (then out_dir is that split's latent directory).
    codec: the VAE (a LatentConfig, its dict, or a VAE path); loaded once here to fingerprint its weights.
    use_ray: Ray Data batch inference, streaming, with an actor pool of `workers` actors, each reserving
        `num_cpus` CPUs and, with use_gpu, one GPU; Ray Data's read tasks need a free CPU beside them, so a
        Ray task calling this should itself reserve none. None = use Ray iff it is already initialised
        (inside a pipeline step). False: in-process, on CUDA if use_gpu and available, one whole split in
        memory at a time. On the same kind of device both paths write the same bytes.
    A split whose manifest records the same recipe (source content hash, VAE weights, codec settings,
    storage dtype) is not encoded again.
    """
    from biflow.data import read_manifest

    cfg = _as_config(codec)
    src_dir, out_dir = Path(src_dir).expanduser().resolve(), Path(out_dir)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    local_device = "cuda" if use_gpu and not use_ray and torch.cuda.is_available() else "cpu"
    driver_codec = LatentCodec.load(cfg, local_device)
    identity = {**cfg.model_dump(exclude={"local_files_only"}), **driver_codec.identity()}
    single = (src_dir / MANIFEST).is_file()
    pairs = [(src_dir, out_dir)] if single else [(src_dir / s, out_dir / s) for s in SPLITS if (src_dir / s).is_dir()]
    if not pairs:
        raise ShardError(f"{src_dir}: no image shards (expected train/ and test/, or a manifest)")
    todo: list[tuple[Path, list[str], LatentShardWriter]] = []
    image_shapes, total = set(), 0
    for src, dst in pairs:
        manifest = read_manifest(src)
        smeta = manifest["meta"]
        height, width, channels = (int(s) for s in smeta["image_shape"])
        c, h, w = driver_codec.latent_shape(height, width)
        recipe = {"encoder_version": ENCODER_VERSION, "source_hash": manifest["content_hash"], "storage": cfg.storage,
                  **{k: v for k, v in identity.items() if k not in ("vae", "subfolder")}}
        try:
            done = read_latent_manifest(dst)
            if done["meta"].get("recipe") == recipe and all((dst / f["name"]).is_file() for f in done["files"]):
                log.info("latents: %s already encoded", dst)
                continue
        except ShardError:
            pass
        meta = {"kind": "latent", "name": smeta["name"], "split": smeta["split"], "num_classes": smeta["num_classes"],
                "class_names": smeta.get("class_names") or [str(i) for i in range(int(smeta["num_classes"]))],
                "latent_shape": [c, h, w], "dtype": cfg.storage, "image_shape": [h, w, c],
                "source_image_shape": [height, width, channels], "source_hash": manifest["content_hash"],
                "codec": identity, "recipe": recipe}
        todo.append((src, [f["name"] for f in manifest["files"]], LatentShardWriter(dst, meta, rows_per_shard)))
        image_shapes.add((height, width, channels))
        total += int(manifest["count"])
    bar = tqdm(total=total, desc="VAE encoding", unit="img", disable=None if total else True)  # on a terminal only
    if todo and use_ray:
        if len(image_shapes) > 1:
            raise ShardError(f"{src_dir}: splits have different image shapes {sorted(image_shapes)}")
        files = {str(src / name): writer for src, names, writer in todo for name in names}
        _encode_on_ray(files, cfg, image_shapes.pop(), batch_size, use_gpu, workers, num_cpus, bar)
    for src, _, writer in todo:
        if not use_ray:
            _encode_in_process(src, writer, driver_codec, cfg, batch_size, bar)
        done = writer.close()
        log.info("latents: encoded %d images of %s into %s", done["count"], src, writer.out_dir)
    bar.close()
    return out_dir
