"""biflow sample: draw images from a checkpoint with the 1-NFE reverse model or the exact inverse."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from biflow.sampling.draw import SAMPLERS

HELP = "draw samples from a checkpoint into an .npz (images uint8 NHWC, labels) and optionally a PNG grid"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="forward.pt (exact sampler) or reverse.pt (either sampler)")
    p.add_argument("--sampler", choices=SAMPLERS, default="1nfe", help="1nfe: one pass of the reverse model; exact: causal inverse of the flow")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--label", type=int, default=None, help="class for every sample (default: classes in turn)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale (w for 1nfe, g for exact)")
    p.add_argument("--no-denoise", action="store_true", help="exact sampler: skip the score-based denoising step")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--grid", action="store_true", help="also write a PNG grid next to the .npz")


def run(args) -> int:
    from biflow.data import save_grid, to_uint8
    from biflow.sampling.draw import draw

    x, labels = draw(args.checkpoint, args.sampler, args.num, args.label, args.guidance,
                     not args.no_denoise, args.seed, args.device)
    images = to_uint8(x.cpu())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, images=images, labels=np.asarray(labels if labels is not None else [], dtype=np.int64))
    print(f"{len(images)} samples -> {args.out}")
    if args.grid:
        grid = args.out.with_suffix(".png")
        save_grid(images, grid, nrow=int(np.ceil(np.sqrt(len(images)))))
        print(f"grid -> {grid}")
    return 0
