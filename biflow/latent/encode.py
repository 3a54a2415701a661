"""Image shards -> latent shards with a frozen VAE: Ray Data batch inference (an actor pool, one GPU per actor
with use_gpu) or in-process. The shard format is biflow.data.latent_shards."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from biflow.config import LatentConfig
from biflow.data.latent_shards import SPLITS, NUMPY_DTYPES, LatentShardWriter, read_latent_manifest
from biflow.data.parts import MANIFEST, ShardError
from biflow.latent.vae import LatentCodec, _as_config

log = logging.getLogger(__name__)

ENCODER_VERSION = 1  # bump when the encoding of a batch changes, so latent shards are rebuilt


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
        latents = encode_batch(self.codec, images, self.cfg.seed).astype(NUMPY_DTYPES[self.cfg.storage])
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
        memory at a time. Both paths encode on int(num_cpus) torch threads (the VAE's float results depend on
        the thread count and the batch size), so on the same kind of device they write the same bytes,
        whatever thread count the calling process had.
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
    threads = torch.get_num_threads()
    torch.set_num_threads(int(max(1, num_cpus)))  # as each actor does
    try:
        for src, _, writer in todo:
            if not use_ray:
                _encode_in_process(src, writer, driver_codec, cfg, batch_size, bar)
            done = writer.close()
            log.info("latents: encoded %d images of %s into %s", done["count"], src, writer.out_dir)
    finally:
        torch.set_num_threads(threads)
    bar.close()
    return out_dir
