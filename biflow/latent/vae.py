"""A frozen pretrained VAE between images and the flow's latent space (BIFLOW.md §4, §6; docs/PAPER_SCALE.md).

    latents = (posterior - shift_factor) * scaling_factor        encode: images [-1, 1] (N, 3, H, W) -> (N, 4, H/8, W/8)
    images  = decoder(latents / scaling_factor + shift_factor)   decode: latents -> images, nominally [-1, 1]

The VAE is a diffusers `AutoencoderKL` (the Stable Diffusion VAE and its relatives), loaded from a local
directory or a hub id already in the local cache: nothing is downloaded unless the config says so. The
scaling factor (0.18215 for SD-VAE: it brings ImageNet latents to about unit variance) and the shift
(SD3/FLUX VAEs) are read from the VAE's config unless the config here overrides them.

`mode` picks the latent of an image: the posterior mean (default: deterministic, so latent shards are
reproducible and content-addressed), or one posterior sample. SD-VAE's posterior std is tiny next to the
sigma = 0.3 noise augmentation the flow adds to latents [STARFlow], so the two differ little in practice;
a stored sample freezes one draw per image (it is not redrawn per epoch).

The codec is frozen (eval mode, no parameter gradients) but differentiable: gradients flow through
`decode` into its input, which is how the perceptual loss reaches the reverse model (objectives.reverse).
diffusers is an optional extra: `pip install -e '.[latent]'`.
"""
from __future__ import annotations

import hashlib
import importlib.util
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from biflow.config import LatentConfig
from biflow.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("latent space needs diffusers: pip install -e '.[latent]'") from None
    return AutoencoderKL


def tiny_vae(latent_channels: int = 4, downsample: int = 8, width: int = 8, seed: int = 0, **config: Any):
    """A real, randomly initialised AutoencoderKL with tiny blocks (tests): same class and interface as SD-VAE.

    downsample: spatial factor (a power of 2; SD-VAE's is 8). config: further AutoencoderKL arguments,
    e.g. scaling_factor (default 0.18215, like SD-VAE).
    """
    levels = int(round(np.log2(downsample))) + 1
    if 2 ** (levels - 1) != downsample:
        raise ValueError(f"downsample must be a power of 2, got {downsample}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _autoencoder_kl()(
            in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(width,) * levels, norm_num_groups=min(4, width), **config,
        )


class LatentCodec(nn.Module):
    """Frozen VAE: encode(images) -> scaled latents (N, C, H/f, W/f); decode(latents) -> images (N, 3, H, W)."""

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None, shift_factor: float | None = None,
                 mode: str = "mean", channels_last: bool = False):
        super().__init__()
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
        vcfg = vae.config
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else getattr(vcfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None else getattr(vcfg, "shift_factor", None) or 0.0)
        self.mode = mode
        self.latent_channels = int(vcfg.latent_channels)
        self.downsample = 2 ** (len(vcfg.block_out_channels) - 1)  # one 2x downsampling per encoder block but the last
        if channels_last:  # cuDNN's fastest conv layouts on tensor cores; a convnet, unlike the flows' transformers
            self.vae.to(memory_format=torch.channels_last)
        self.channels_last = channels_last

    @classmethod
    def load(cls, spec: LatentConfig | str | dict, device: str | torch.device = "cpu",
             channels_last: bool | None = None) -> "LatentCodec":
        """The codec of a LatentConfig (or a VAE path / dict of LatentConfig fields) on `device`.

        channels_last: None = on CUDA only. Loading problems are one-line UserErrors.
        """
        cfg = _as_config(spec)
        device = torch.device(device)
        try:
            vae = _autoencoder_kl().from_pretrained(cfg.vae, subfolder=cfg.subfolder, torch_dtype=DTYPES[cfg.dtype],
                                                    local_files_only=cfg.local_files_only,
                                                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
        except UserError:
            raise
        except Exception as err:  # missing directory, not in the cache, not an AutoencoderKL, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"VAE {cfg.vae!r}{f' (subfolder {cfg.subfolder})' if cfg.subfolder else ''} could not be loaded: {first}") from None
        codec = cls(vae, cfg.scaling_factor, cfg.shift_factor, cfg.mode,
                    channels_last=device.type == "cuda" if channels_last is None else channels_last)
        return codec.to(device)

    def train(self, mode: bool = True) -> "LatentCodec":
        return super().train(False)  # always frozen

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an H x W image."""
        width = height if width is None else width
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image {height}x{width} is not divisible by the VAE's downsampling factor {self.downsample}")
        return self.latent_channels, height // self.downsample, width // self.downsample

    def fingerprint(self) -> str:
        """sha256 of the VAE's weights (names, shapes, dtypes and bytes): what latent shards were made with."""
        h = hashlib.sha256()
        for name, t in sorted(self.vae.state_dict().items()):
            h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def identity(self) -> dict[str, Any]:
        """JSON description for shard metadata and cache keys."""
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, "mode": self.mode,
                "dtype": str(self.dtype).removeprefix("torch."), "latent_channels": self.latent_channels,
                "downsample": self.downsample, "weights_sha256": self.fingerprint()}

    def _images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1] -> the VAE's input (N, 3, H, W) on its device and dtype."""
        if isinstance(images, np.ndarray) and not images.flags.writeable:  # e.g. a view of Arrow buffers
            images = images.copy()
        t = torch.as_tensor(images)
        if t.dtype == torch.uint8:
            from biflow.data import to_model

            t = to_model(t)
        if t.ndim != 4 or not t.is_floating_point():
            raise ValueError(f"encode: expected uint8 (N, H, W, C) or float (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)  # greyscale -> RGB
        self.latent_shape(t.shape[2], t.shape[3])
        t = t.to(self.device, self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    # ------------------------------------------------------------------ codec
    def encode(self, images: np.ndarray | torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]) -> scaled latents float32 (N, C, H/f, W/f).

        mode 'sample': mean + std * noise, with `noise` (N, C, h, w) if given, else drawn from `generator`.
        """
        post = self.vae.encode(self._images(images)).latent_dist
        lat = post.mean
        if self.mode == "sample":
            eps = noise if noise is not None else torch.randn(lat.shape, generator=generator, device=lat.device)
            lat = lat + post.std * eps.to(lat.device, lat.dtype)
        return (lat.float() - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images float32 (N, 3, h*f, w*f), nominally [-1, 1] (not clamped:
        clamping would stop the perceptual loss's gradient at saturated pixels; to_uint8 clamps)."""
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z).sample.float()

    @torch.no_grad()
    def decode_uint8(self, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Latents (N, C, h, w) -> uint8 (N, H, W, 3) images, decoded in batches (samples for evaluation and grids)."""
        from biflow.data import to_uint8

        return np.concatenate([to_uint8(self.decode(latents[i : i + batch_size].to(self.device)))
                               for i in range(0, len(latents), batch_size)])


def _as_config(spec: LatentConfig | str | dict) -> LatentConfig:
    if isinstance(spec, LatentConfig):
        return spec
    if isinstance(spec, str):
        return LatentConfig(vae=spec)
    from biflow.config import validate

    return validate(LatentConfig, dict(spec), "latent")
