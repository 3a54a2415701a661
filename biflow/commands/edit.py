"""biflow inpaint / biflow edit share this: load the F/G pair and pick input images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from biflow.errors import UserError

HELP = "class editing: encode images with F under their class, decode with G under another class"


def add_input_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="reverse.pt (its forward flow is found through the checkpoint)")
    p.add_argument("--input", type=Path, help=".npz with images (uint8 NHWC) and labels; default: the test split")
    p.add_argument("--num", type=int, default=10, help="number of images (from --input or the test split)")
    p.add_argument("--guidance", type=float, default=0.0, help="w of the reverse model")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", type=Path, required=True, help="output .npz (images, labels); a PNG grid is written next to it")


def add_arguments(p) -> None:
    add_input_arguments(p)
    p.add_argument("--to-label", type=int, required=True, help="target class")


def load_pair_and_inputs(args):
    """(pair, x, y, images) from the CLI arguments: the F/G pair (biflow.sampling.draw.Pair), the inputs as the
    flows see them (x: pixels, or VAE latents), their labels and the input images (N, C, H, W) in [-1, 1]."""
    from biflow.checkpoint import read_checkpoint
    from biflow.data import load_split, to_model
    from biflow.sampling.draw import load_pair

    pair = load_pair(args.checkpoint)
    if args.input is not None:
        if not args.input.is_file():
            raise UserError(f"{args.input}: input file not found")
        data = np.load(args.input)
        images, labels = data["images"], data["labels"]
    else:
        test = load_split(read_checkpoint(args.checkpoint)["data_dir"], "test")
        images, labels = test.images, test.labels
    images, labels = images[: args.num], labels[: args.num]
    if images.shape[1:] != pair.image_shape:
        raise UserError(f"input images have shape {images.shape[1:]}, the model expects {pair.image_shape}")
    return pair, pair.encode(images), torch.as_tensor(labels, dtype=torch.long), to_model(images)


def write_outputs(out: Path, rows: list[torch.Tensor], labels: torch.Tensor) -> None:
    """The last row is the result (.npz); the grid shows every row, one input image per column."""
    from biflow.data import save_grid, to_uint8

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=to_uint8(rows[-1]), labels=labels.numpy())
    save_grid(to_uint8(torch.cat(rows)), out.with_suffix(".png"), nrow=rows[0].shape[0])
    print(f"{rows[-1].shape[0]} images -> {out} (grid: {out.with_suffix('.png')})")


def run(args) -> int:
    from biflow.sampling.applications import edit_class

    pair, x, y, images = load_pair_and_inputs(args)
    classes = pair.flow.cfg.num_classes
    if classes and not 0 <= args.to_label < classes:
        raise UserError(f"--to-label {args.to_label} is out of range: the model has {classes} classes")
    y_dst = torch.full_like(y, args.to_label)
    with torch.no_grad():
        edited = edit_class(pair.flow, pair.reverse, x, y, y_dst, w=args.guidance,
                            generator=torch.Generator().manual_seed(args.seed))
    write_outputs(args.out, [images, pair.decode(edited)], y_dst)  # rows: original | edited
    return 0
