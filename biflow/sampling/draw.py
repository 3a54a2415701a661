"""The one way from a checkpoint to a sampler: `load_sampler` (biflow sample, biflow eval, the pipeline's
evaluate step, sweep trials and their serial timing all use it) and `draw`, a batch of images from it.

    exact  the forward flow's causal inverse, B * (T - 1) sequential steps (x2 guided), + the Tweedie step
    1nfe   the reverse model G in one pass (+ the Tweedie step when G was trained without learned denoising)

A forward checkpoint serves `exact`; a reverse checkpoint serves both (it records its forward flow).
Latent-space checkpoints sample latents; `Sampler.decode` is the frozen VAE decoder that turns them into images.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from biflow.checkpoint import load_checkpoint, read_checkpoint
from biflow.device import resolve_device
from biflow.errors import UserError

SAMPLERS = ("1nfe", "exact")
Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Sampler:
    """A loaded sampler: `sample(n, labels)` -> model-space samples (n, C, H, W) on its device."""

    name: str  # "1nfe" | "exact"
    sample: Callable[[int, torch.Tensor | None], torch.Tensor]  # labels: int64 (n,) on any device, or None
    num_classes: int  # 0: unconditional
    nfe: int  # sequential network evaluations per sample (metrics.speed.sampler_nfe)
    denoise: bool  # whether the score-based (Tweedie) step is applied
    decode: Decoder | None  # latent space: latents -> images (N, 3, H, W) in [-1, 1]; None in pixel space
    record: dict  # the checkpoint's entries other than its tensors (kind, data, data_dir, data_hash, ...)

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as images in [-1, 1] (decoded in latent space)."""
        return self.decode(samples) if self.decode is not None else samples


def forward_checkpoint_of(path: str | Path) -> Path:
    """A forward checkpoint is itself; a reverse checkpoint names the forward flow it was trained against."""
    ckpt = read_checkpoint(path)
    if ckpt["kind"] == "forward":
        return Path(path)
    ref = ckpt.get("forward_checkpoint")
    if not ref:
        raise UserError(f"{path}: reverse checkpoint does not record its forward flow")
    return Path(ref)


def image_decoder(ckpt: dict, device: str | torch.device = "cpu") -> Decoder | None:
    """The frozen VAE decoder of a latent-space checkpoint (latents -> images (N, 3, H, W), nominally [-1, 1]);
    None for a pixel-space one."""
    if not ckpt.get("latent"):
        return None
    from biflow.latent import LatentCodec

    return torch.no_grad()(LatentCodec.load(ckpt["latent"], device).decode)


def default_sampler(ckpt: dict) -> str:
    """1nfe for a reverse checkpoint, exact for a forward one."""
    return "1nfe" if ckpt["kind"] == "reverse" else "exact"


def load_sampler(path: str | Path, sampler: str | None = None, guidance: float = 0.0, denoise: bool = True,
                 seed: int = 0, device: str | torch.device = "cpu") -> Sampler:
    """The named sampler of the checkpoint at `path` (None: `default_sampler`), its noise seeded by `seed`.

    guidance: w of the 1-NFE model, g of the exact inverse. denoise: apply the Tweedie step where it applies
    (exact with noise_std > 0; 1nfe only for a model trained with denoising 'score').
    """
    from biflow.metrics.speed import sampler_nfe
    from biflow.sampling.exact import sample_exact
    from biflow.sampling.onenfe import sample_1nfe

    device = resolve_device(device, "--device")
    ckpt = read_checkpoint(path)
    sampler = sampler or default_sampler(ckpt)
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    gen = torch.Generator(device).manual_seed(seed)
    decode = image_decoder(ckpt, device)
    record = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "ema_count", "optimizer", "scheduler")}
    on_device = lambda y: None if y is None else y.to(device)  # noqa: E731
    if sampler == "exact":
        flow = load_checkpoint(forward_checkpoint_of(path), device=device)
        score = denoise and flow.cfg.noise_std > 0
        nfe = sampler_nfe("exact", num_blocks=flow.cfg.num_blocks, num_tokens=flow.cfg.num_tokens, guidance=guidance,
                          conditional=flow.cfg.num_classes > 0, denoise=score)
        return Sampler("exact", lambda n, y: sample_exact(flow, n, on_device(y), guidance, denoise, generator=gen),
                       flow.cfg.num_classes, nfe, score, decode, record)
    if ckpt["kind"] != "reverse":
        raise UserError(f"{path}: the 1nfe sampler needs a reverse-model checkpoint (this one is {ckpt['kind']}); "
                        "use the exact sampler")
    reverse = load_checkpoint(path, device=device)
    score = denoise and ckpt.get("denoising") == "score"  # trained without learned denoising: TARFlow's step
    flow = load_checkpoint(forward_checkpoint_of(path), device=device) if score else None
    return Sampler("1nfe", lambda n, y: sample_1nfe(reverse, n, on_device(y), guidance, generator=gen, denoise_flow=flow),
                   reverse.cfg.num_classes, sampler_nfe("1nfe", denoise=score), score, decode, record)


@dataclass
class Pair:
    """The F / G pair of a reverse checkpoint, for the training-free applications (inpainting, class editing)."""

    flow: torch.nn.Module  # ForwardFlow (EMA weights)
    reverse: torch.nn.Module  # ReverseModel (EMA weights)
    image_shape: tuple[int, int, int]  # (H, W, C) of the images it takes (decoded size in latent space)
    encode: Callable[[object], torch.Tensor]  # uint8 images (N, H, W, C) -> model space (pixels in [-1, 1], or latents)
    decode: Decoder  # model space -> images (N, C, H, W) in [-1, 1]


def load_pair(path: str | Path, device: str | torch.device = "cpu") -> Pair:
    """The reverse checkpoint at `path` with its forward flow and, in latent space, its VAE."""
    from biflow.data.transforms import to_model

    ckpt = read_checkpoint(path)
    if ckpt["kind"] != "reverse":
        raise UserError(f"{path}: needs a reverse-model checkpoint (this one is {ckpt['kind']})")
    flow = load_checkpoint(forward_checkpoint_of(path), device=device)
    reverse = load_checkpoint(path, device=device)
    side, channels = flow.cfg.image_size, flow.cfg.in_channels
    if not ckpt.get("latent"):
        return Pair(flow, reverse, (side, side, channels), lambda images: to_model(images).to(device), lambda x: x)
    from biflow.latent import LatentCodec

    codec = LatentCodec.load(ckpt["latent"], device)
    side *= codec.downsample
    return Pair(flow, reverse, (side, side, 3), torch.no_grad()(codec.encode), torch.no_grad()(codec.decode))


def class_labels(num: int, label: int | None, num_classes: int) -> torch.Tensor | None:
    """A fixed label, or classes in turn (0, 1, ..., K-1, 0, ...) for a class-conditional model."""
    if not num_classes:
        if label is not None:
            raise UserError("--label given but the model is unconditional")
        return None
    if label is not None and not 0 <= label < num_classes:
        raise UserError(f"--label {label} is out of range: the model has {num_classes} classes")
    return torch.full((num,), label) if label is not None else torch.arange(num) % num_classes


def draw(path: str | Path, sampler: str, num: int, label: int | None = None, guidance: float = 0.0,
         denoise: bool = True, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (num, C, H, W) in [-1, 1] and their labels, from the checkpoint at `path` (latent-space samples decoded)."""
    s = load_sampler(path, sampler, guidance, denoise, seed, device)
    labels = class_labels(num, label, s.num_classes)
    return s.images(s.sample(num, labels)), labels
