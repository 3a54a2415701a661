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
    """(flow, reverse, x, y, images, to_images) from the CLI arguments.

    images: the inputs (N, C, H, W) in [-1, 1]; x: what the flows see, the images themselves or, for a
    latent-space pair, their VAE latents; to_images: model space -> images (the VAE decoder, or the identity).
    """
    from biflow.checkpoint import load_checkpoint, read_checkpoint
    from biflow.data import load_split, to_model
    from biflow.sampling.draw import forward_checkpoint_of

    ckpt = read_checkpoint(args.checkpoint)
    if ckpt["kind"] != "reverse":
        raise UserError(f"{args.checkpoint}: needs a reverse-model checkpoint (this one is {ckpt['kind']})")
    flow = load_checkpoint(forward_checkpoint_of(args.checkpoint))
    reverse = load_checkpoint(args.checkpoint)
    if args.input is not None:
        if not args.input.is_file():
            raise UserError(f"{args.input}: input file not found")
        data = np.load(args.input)
        images, labels = data["images"], data["labels"]
    else:
        test = load_split(ckpt["data_dir"], "test")
        images, labels = test.images, test.labels
    images, labels = images[: args.num], labels[: args.num]
    codec = None
    if ckpt.get("latent"):
        from biflow.latent import LatentCodec

        codec = LatentCodec.load(ckpt["latent"])
    scale = codec.downsample if codec is not None else 1
    channels = 3 if codec is not None else flow.cfg.in_channels
    want = (flow.cfg.image_size * scale, flow.cfg.image_size * scale, channels)
    if images.shape[1:] != want:
        raise UserError(f"input images have shape {images.shape[1:]}, the model expects {want}")
    pixels = to_model(images)
    y = torch.as_tensor(labels, dtype=torch.long)
    if codec is None:
        return flow, reverse, pixels, y, pixels, lambda t: t
    with torch.no_grad():
        return flow, reverse, codec.encode(images), y, pixels, torch.no_grad()(codec.decode)


def write_outputs(out: Path, rows: list[torch.Tensor], labels: torch.Tensor) -> None:
    """The last row is the result (.npz); the grid shows every row, one input image per column."""
    from biflow.data import save_grid, to_uint8

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=to_uint8(rows[-1]), labels=labels.numpy())
    save_grid(to_uint8(torch.cat(rows)), out.with_suffix(".png"), nrow=rows[0].shape[0])
    print(f"{rows[-1].shape[0]} images -> {out} (grid: {out.with_suffix('.png')})")


def run(args) -> int:
    from biflow.sampling.applications import edit_class

    flow, reverse, x, y, images, to_images = load_pair_and_inputs(args)
    if flow.cfg.num_classes and not 0 <= args.to_label < flow.cfg.num_classes:
        raise UserError(f"--to-label {args.to_label} is out of range: the model has {flow.cfg.num_classes} classes")
    y_dst = torch.full_like(y, args.to_label)
    with torch.no_grad():
        edited = edit_class(flow, reverse, x, y, y_dst, w=args.guidance, generator=torch.Generator().manual_seed(args.seed))
    write_outputs(args.out, [images, to_images(edited)], y_dst)  # rows: original | edited
    return 0
