"""Training-free applications of the F / G pair (BIFLOW.md §6): inpainting and class editing.

Both encode an image to noise with the forward flow F, edit the noise or the condition, and decode
with the 1-NFE reverse model G. F encodes x~ = x + sigma*eps (sigma = flow.cfg.noise_std), the input
distribution G was trained on.
"""
from __future__ import annotations

import torch

from biflow.models.forward_flow import ForwardFlow
from biflow.models.layers import patchify, unpatchify
from biflow.models.reverse import ReverseModel
from biflow.sampling.onenfe import as_labels


@torch.no_grad()
def encode(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = F(x + sigma*eps | y), (N, C, H, W)."""
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    z, _, _ = flow(x + flow.cfg.noise_std * eps, as_labels(y, x.shape[0], x.device))
    return z


def token_mask(mask: torch.Tensor, shape: torch.Size, patch_size: int) -> torch.Tensor:
    """Pixel mask (N or 1, 1 or C, H, W), 1 = known -> boolean mask of `shape` (N, C, H, W) at token granularity.

    z has one D-vector per patch token, like x, and F transforms a token's pixels together (one set of affine
    parameters per token), so a token counts as known only if ALL its pixels (all channels) are known;
    partially known tokens get fresh noise.
    """
    n, c = shape[:2]
    known = patchify((mask > 0.5).float().expand(n, c, -1, -1), patch_size)  # (N, T, D)
    known = known.amin(dim=-1, keepdim=True).expand_as(known)  # a token is known iff all its pixels are
    return unpatchify(known, patch_size, c) > 0.5


REGIONS = ("top", "bottom", "left", "right", "center")


def region_mask(keep: str, size: int) -> torch.Tensor:
    """(1, 1, size, size) mask of a named region (REGIONS), 1 = known pixels."""
    if keep not in REGIONS:
        raise ValueError(f"unknown region {keep!r}; choose one of {', '.join(REGIONS)}")
    m = torch.zeros(1, 1, size, size)
    half, q = size // 2, size // 4
    region = {"top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
              "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
              "center": (slice(q, size - q), slice(q, size - q))}[keep]
    m[(0, 0, *region)] = 1
    return m


@torch.no_grad()
def inpaint(
    flow: ForwardFlow,
    reverse: ReverseModel,
    x: torch.Tensor,
    mask: torch.Tensor,
    y: torch.Tensor | int | None = None,
    w: torch.Tensor | float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill the unknown pixels of x (N, C, H, W); mask (N or 1, 1 or C, H, W) is 1 where x is known.

    Keeps F's noise on fully known tokens, draws fresh N(0, I) noise elsewhere, decodes with G in one
    pass, and pastes the known pixels of x back over G's output.
    """
    z = encode(flow, x, y, generator)
    keep = token_mask(mask, x.shape, flow.cfg.patch_size)
    z = torch.where(keep, z, torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
    out, _ = reverse(z, as_labels(y, x.shape[0], x.device), w)
    known = (mask > 0.5).expand_as(x)
    return torch.where(known, x, out)


@torch.no_grad()
def edit_class(
    flow: ForwardFlow,
    reverse: ReverseModel,
    x: torch.Tensor,
    y_src: torch.Tensor | int,
    y_dst: torch.Tensor | int,
    w: torch.Tensor | float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-render x (N, C, H, W) as class y_dst: encode under y_src with F, decode under y_dst with G."""
    z = encode(flow, x, y_src, generator)
    out, _ = reverse(z, as_labels(y_dst, x.shape[0], x.device), w)
    return out
