"""Latent space: a frozen pretrained VAE (diffusers AutoencoderKL) and the encoding of image shards into latents.

    LatentCodec.load(LatentConfig | path, device)  encode: images -> scaled latents; decode: latents -> images
    encode_shards(src_dir, out_dir, codec, batch_size, use_gpu)   image shards -> latent shards (Ray Data or in-process)
    tiny_vae(...)  a randomly initialised AutoencoderKL with tiny blocks, for tests

The latent shard format itself lives in the data layer (biflow.data.latent_shards: `load_latent_split`,
`read_latent_shards`, ...); its names are re-exported here for convenience.
diffusers is imported only when a VAE is built (optional extra: pip install -e '.[latent]').
"""
from biflow.data.latent_shards import (
    LatentSet,
    LatentShardWriter,
    latent_batches,
    latents_from_rows,
    load_latent_split,
    read_latent_manifest,
    read_latent_shards,
)
from biflow.latent.encode import content_noise, encode_batch, encode_shards
from biflow.latent.vae import LatentCodec, tiny_vae

__all__ = [
    "LatentCodec",
    "LatentSet",
    "LatentShardWriter",
    "content_noise",
    "encode_batch",
    "encode_shards",
    "latent_batches",
    "latents_from_rows",
    "load_latent_split",
    "read_latent_manifest",
    "read_latent_shards",
    "tiny_vae",
]
