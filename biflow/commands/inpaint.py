"""biflow inpaint: keep a region of each image, resample the rest through F's noise and G (no training)."""
from __future__ import annotations

import torch

from biflow.commands.edit import add_input_arguments, load_pair_and_inputs, write_outputs

HELP = "inpainting: keep the noise of the known region (--keep), resample the rest, decode with G in one pass"
REGIONS = ("top", "bottom", "left", "right", "center")


def region_mask(keep: str, size: int) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 = known pixels."""
    m = torch.zeros(1, 1, size, size)
    half, q = size // 2, size // 4
    region = {"top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
              "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
              "center": (slice(q, size - q), slice(q, size - q))}[keep]
    m[(0, 0, *region)] = 1
    return m


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--keep", choices=REGIONS, default="top", help="the known region; everything else is resampled")


def run(args) -> int:
    from biflow.sampling.applications import inpaint

    flow, reverse, x, y, images, to_images = load_pair_and_inputs(args)
    mask = region_mask(args.keep, flow.cfg.image_size)  # in model space: pixels, or latent positions
    with torch.no_grad():
        filled = inpaint(flow, reverse, x, mask, y, w=args.guidance, generator=torch.Generator().manual_seed(args.seed))
    shown = region_mask(args.keep, images.shape[-1])
    write_outputs(args.out, [images, images * shown - (1 - shown), to_images(filled)], y)  # original | known | inpainted
    return 0
