"""One entry point for drawing samples from a checkpoint with a named sampler (CLI, eval, pipelines)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from biflow.checkpoint import load_checkpoint, read_checkpoint
from biflow.errors import UserError

SAMPLERS = ("1nfe", "exact")


def forward_checkpoint_of(path: str | Path) -> Path:
    """A forward checkpoint is itself; a reverse checkpoint names the forward flow it was trained against."""
    ckpt = read_checkpoint(path)
    if ckpt["kind"] == "forward":
        return Path(path)
    ref = ckpt.get("forward_checkpoint")
    if not ref:
        raise UserError(f"{path}: reverse checkpoint does not record its forward flow")
    return Path(ref)


def image_decoder(ckpt: dict, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen VAE decoder of a latent-space checkpoint (latents -> images (N, 3, H, W), nominally [-1, 1]);
    None for a pixel-space one."""
    if not ckpt.get("latent"):
        return None
    from biflow.latent import LatentCodec

    return torch.no_grad()(LatentCodec.load(ckpt["latent"], device).decode)


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
    from biflow.sampling import sample_1nfe, sample_exact

    gen = torch.Generator(device).manual_seed(seed)
    ckpt = read_checkpoint(path)
    decode = image_decoder(ckpt, device) or (lambda x: x)
    if sampler == "exact":
        flow = load_checkpoint(forward_checkpoint_of(path), device=device)
        labels = class_labels(num, label, flow.cfg.num_classes)
        return decode(sample_exact(flow, num, labels, guidance, denoise, generator=gen)), labels
    if sampler == "1nfe":
        if ckpt["kind"] != "reverse":
            raise UserError(f"{path}: the 1nfe sampler needs a reverse-model checkpoint (this one is {ckpt['kind']})")
        reverse = load_checkpoint(path, device=device)
        labels = class_labels(num, label, reverse.cfg.num_classes)
        score_step = ckpt.get("denoising") == "score" and denoise  # trained without learned denoising: TARFlow's step
        flow = load_checkpoint(forward_checkpoint_of(path), device=device) if score_step else None
        return decode(sample_1nfe(reverse, num, labels, guidance, generator=gen, denoise_flow=flow)), labels
    raise UserError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
