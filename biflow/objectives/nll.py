"""Stage-1 objective: exact negative log-likelihood of the forward flow, and bits per dimension."""
from __future__ import annotations

import math

import torch

# Pixels u in {0..255} map to x = u / 127.5 - 1, so one intensity bin has width 1 / 127.5 in x-space.
PIXEL_BIN_LOG = math.log(127.5)


def nll_loss(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """0.5 * mean(z^2) - mean(logdet) / dims: the NLL per dimension without the Gaussian constant."""
    dims = z[0].numel()
    z = z if z.dtype == torch.float64 else z.float()
    return 0.5 * z.pow(2).mean() - logdet.mean() / dims


def bits_per_dim(log_prob: torch.Tensor, dims: int, pixels: bool = True) -> torch.Tensor:
    """Per-sample bits/dim from log p(x) in nats. `pixels`: add the 8-bit dequantisation term.

    For 8-bit data the discrete likelihood of a bin is approximated by density x bin width, so
    -log2 P(u) / dims = (-log p(x) / dims + log 127.5) / log 2.
    """
    nll = -log_prob / dims
    if pixels:
        nll = nll + PIXEL_BIN_LOG
    return nll / math.log(2)


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit pixels x = u / 127.5 - 1 -> x + (v - 1/2) / 127.5 with v ~ U[0, 1) per value: uniform dequantisation.

    Each pixel value is spread uniformly over its own bin (width 1/127.5, centred on it; the bins tile the line),
    so by Jensen's inequality E_v[-log p(x + ...)] + log 127.5 per dimension bounds the discrete NLL -log P(u) from
    above: the standard bits/dim of flows (TARFlow's protocol), comparable with published numbers.
    """
    v = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x + (v - 0.5) / 127.5


def drop_labels(y: torch.Tensor | None, p: float, null: int) -> torch.Tensor | None:
    """Replace each label by the null label with probability p (classifier-free guidance training)."""
    if y is None or p <= 0:
        return y
    mask = torch.rand(y.shape, device=y.device) < p
    return torch.where(mask, torch.full_like(y, null), y)
