"""Paired random-resized crop before the perceptual nets: one box per pair, the same for G's output and its target.

As torchvision's RandomResizedCrop (and pMF's auxiliary losses): the box's area is a fraction U(scale) of the image,
its aspect ratio (width / height) log-uniform in `ratio`, its position uniform where it fits; a draw that does not
fit is redrawn (10 rounds, vectorised), then the whole image is used, as torchvision falls back to. Unlike
torchvision the box is continuous (no rounding to whole pixels) and the resampling is differentiable (bicubic
`grid_sample`), so the gradient reaches G through its cropped output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROUNDS = 10  # redraws before the fallback, as torchvision


def random_resized_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], aspect: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """n boxes (N, 4) = (left, top, width, height) as fractions of an image whose width / height = aspect.

    area fraction w*h in [scale], box aspect (w*W)/(h*H) in [ratio], 0 <= left, top and left + w, top + h <= 1.
    """
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    kw = dict(dtype=torch.float64, device=generator.device if generator is not None else "cpu")
    w, h = torch.ones(n, **kw), torch.ones(n, **kw)
    done = torch.zeros(n, dtype=torch.bool, device=kw["device"])
    for _ in range(ROUNDS):
        area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator, **kw)
        r = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, **kw))
        wi, hi_ = (area * r / aspect).sqrt(), (area * aspect / r).sqrt()  # (wi*W)/(hi_*H) = r, wi*hi_ = area
        ok = ~done & (wi <= 1) & (hi_ <= 1)
        w, h, done = torch.where(ok, wi, w), torch.where(ok, hi_, h), done | ok
    offset = torch.rand(n, 2, generator=generator, **kw)
    return torch.stack([offset[:, 0] * (1 - w), offset[:, 1] * (1 - h), w, h], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """x (N, C, H, W), boxes (N, 4) fractions -> (N, C, size, size): each image's box resampled (differentiable)."""
    n = x.shape[0]
    b = boxes.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = b[:, 2], b[:, 3]  # half-extent in [-1, 1] coordinates = the box's fraction
    theta[:, 0, 2] = 2 * b[:, 0] + b[:, 2] - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 2] = 2 * b[:, 1] + b[:, 3] - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def paired_crop(a: torch.Tensor, b: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random-resized box per pair, applied to both images: (a, b) (N, C, H, W) -> two (N, C, size, size)."""
    boxes = random_resized_boxes(a.shape[0], scale, ratio, a.shape[-1] / a.shape[-2], generator)
    return crop_resize(a, boxes, size), crop_resize(b, boxes, size)
