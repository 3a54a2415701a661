"""Data layer: Parquet image shards, built-in datasets, and pixel <-> tensor transforms.

    prepare(cfg, out_dir) -> out_dir with train/ and test/ shard directories
    load_split(cfg_or_dir, split) -> ShardSet(images uint8 (N, H, W, C), labels int64 (N,), meta, content_hash)
    ShardWriter(out_dir, meta, image_shape, count).add(images, labels) ... .close()  streams a shard directory
    batches(shardset, batch_size, seed, device) -> endless (x float32 (B, C, H, W) in [-1, 1], y int64 (B,))
    TrainingData.open(root)  a prepared root in model space, pixels or VAE latents alike (what training reads)
"""
from biflow.data.builtin import (
    digits_arrays,
    load_split,
    patches_arrays,
    prepare,
    prepared_dir,
    split_indices,
)
from biflow.data.imagefolder import imagefolder_source
from biflow.data.model_space import TrainingData
from biflow.data.parts import DataError
from biflow.data.shards import ShardError, ShardSet, ShardWriter, read_manifest, read_shards, write_shards
from biflow.data.transforms import batches, grid_image, save_grid, to_model, to_uint8

__all__ = [
    "DataError",
    "ShardError",
    "ShardSet",
    "ShardWriter",
    "TrainingData",
    "batches",
    "digits_arrays",
    "grid_image",
    "imagefolder_source",
    "load_split",
    "patches_arrays",
    "prepare",
    "prepared_dir",
    "read_manifest",
    "read_shards",
    "save_grid",
    "split_indices",
    "to_model",
    "to_uint8",
    "write_shards",
]
