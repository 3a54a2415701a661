"""Latent space: a frozen pretrained VAE (diffusers AutoencoderKL) and latent shards (docs/PAPER_SCALE.md).

    LatentCodec.load(LatentConfig | path, device)  encode: images -> scaled latents; decode: latents -> images
    encode_shards(src_dir, out_dir, codec, batch_size, use_gpu)   image shards -> latent shards (Ray Data or in-process)
    load_latent_split(root, split) -> LatentSet;  latent_batches(latents, batch_size, seed, device) -> (x, y) batches
    tiny_vae(...)  a randomly initialised AutoencoderKL with tiny blocks, for tests

diffusers is imported only when a VAE is built (optional extra: pip install -e '.[latent]').
"""
from biflow.latent.shards import (
    LatentSet,
    LatentShardWriter,
    encode_batch,
    encode_shards,
    latent_batches,
    latents_from_rows,
    load_latent_split,
    read_latent_manifest,
    read_latent_shards,
)
from biflow.latent.vae import LatentCodec, tiny_vae

__all__ = [
    "LatentCodec",
    "LatentSet",
    "LatentShardWriter",
    "encode_batch",
    "encode_shards",
    "latent_batches",
    "latents_from_rows",
    "load_latent_split",
    "read_latent_manifest",
    "read_latent_shards",
    "tiny_vae",
]
