"""Perceptual terms on G's final output (BIFLOW.md §5): a list of frozen nets, each with its own distance and weight.

The paper's best setting is two terms, VGG-LPIPS then ConvNeXt-V2 features (FID 31.88 -> 14.15 -> 2.46 in its
ablation (d)); pMF weighs them 0.4 and 0.1 and crops both images of a pair with the same random-resized box first.
Config: `reverse_loss.perceptual_terms` (or the one-net shorthand) and `reverse_loss.perceptual_crop`
(biflow/config/perceptual.py); the nets: objectives/perceptual_nets.py; the crop: objectives/crop.py.

Images are in [-1, 1]; 1-channel images are repeated to 3. With a crop, each pair is cropped once (one box for
every net) to the crop's size; without one, images are resized to max(side, the net's `min_size`). In latent space
objectives.reverse decodes both images with the frozen VAE decoder first. `random_conv` (the offline default) is
NOT the paper's loss: reports name it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from biflow.config import ConfigError, PerceptualCropConfig, ReverseLossConfig
from biflow.objectives.crop import paired_crop
from biflow.objectives.perceptual_nets import PerceptualNet, build_net

PRETRAINED_CROP_SIZE = 224  # crop output side when a pretrained net is used (its ImageNet resolution)


def _rgb(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[1] == 1:
        return a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    if a.shape[1] != 3:
        raise ValueError(f"perceptual distance needs 1- or 3-channel images, got {a.shape[1]} channels (decode latents first)")
    return a, b


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resample to size x size (identity grid, border padding); a no-op resample at the same size."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_size(crop: PerceptualCropConfig, nets: list[PerceptualNet], side: int) -> int:
    """The crop's output side: its `size`, else 224 with a pretrained net, else max(side, the nets' min_size)."""
    if crop.size is not None:
        return crop.size
    return PRETRAINED_CROP_SIZE if any(n.pretrained for n in nets) else max([side, *(n.min_size for n in nets)])


def distances(nets: list[PerceptualNet], a: torch.Tensor, b: torch.Tensor, crop: PerceptualCropConfig | None = None,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Each net's per-sample distance (N,) between images a, b (N, C, H, W) in [-1, 1], differentiable in both;
    with a crop, one box per pair is drawn once and shared by every net."""
    a, b = _rgb(a, b)
    if crop is not None:
        a, b = paired_crop(a, b, crop_size(crop, nets, a.shape[-1]), crop.scale, crop.ratio, generator)
    out = []
    for net in nets:
        size = max(a.shape[-1], net.min_size)
        out.append(net.distance(_resize(a, size), _resize(b, size)))
    return out


def perceptual_distance(net: PerceptualNet, a: torch.Tensor, b: torch.Tensor, crop: PerceptualCropConfig | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One net's per-sample distance (N,) (see `distances`)."""
    return distances([net], a, b, crop, generator)[0]


class PerceptualLoss(nn.Module):
    """The frozen nets of the active perceptual terms, with their labels (log keys), static weights and crop.

    forward(pred, target, generator) -> {label: (N,) distances}.
    """

    def __init__(self, nets: list[PerceptualNet], labels: list[str], weights: list[float],
                 crop: PerceptualCropConfig | None = None):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.labels, self.weights, self.crop = list(labels), list(weights), crop

    def forward(self, pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return dict(zip(self.labels, distances(list(self.nets), pred, target, self.crop, generator)))


def term_labels(nets: list[str]) -> list[str]:
    """Log labels: the net's name, with its position appended where a net appears twice (vgg_lpips, vgg_lpips.1)."""
    return [n if nets.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(nets)]


def build_perceptual(cfg: ReverseLossConfig) -> PerceptualLoss:
    """The frozen nets of cfg's active perceptual terms (`perceptual_list()`); a bad weights file is a ConfigError."""
    terms = cfg.perceptual_list()
    if not terms:
        raise ConfigError("reverse_loss has no active perceptual term (perceptual_terms, or perceptual > 0)")
    nets = [build_net(t.net, t.weights, t.lin_weights, t.seed) for t in terms]
    return PerceptualLoss(nets, term_labels([t.net for t in terms]), [t.weight for t in terms], cfg.perceptual_crop)
