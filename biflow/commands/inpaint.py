"""biflow inpaint: keep a region of each image, resample the rest through F's noise and G (no training)."""
from __future__ import annotations

import torch

from biflow.commands.edit import add_input_arguments, load_pair_and_inputs, write_outputs
from biflow.sampling.applications import REGIONS

HELP = "inpainting: keep the noise of the known region (--keep), resample the rest, decode with G in one pass"


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--keep", choices=REGIONS, default="top", help="the known region; everything else is resampled")


def run(args) -> int:
    from biflow.sampling.applications import inpaint, region_mask

    pair, x, y, images = load_pair_and_inputs(args)
    mask = region_mask(args.keep, pair.flow.cfg.image_size)  # in model space: pixels, or latent positions
    with torch.no_grad():
        filled = inpaint(pair.flow, pair.reverse, x, mask, y, w=args.guidance,
                         generator=torch.Generator().manual_seed(args.seed))
    shown = region_mask(args.keep, images.shape[-1])
    write_outputs(args.out, [images, images * shown - (1 - shown), pair.decode(filled)], y)  # original | known | inpainted
    return 0
