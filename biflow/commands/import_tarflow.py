"""biflow import-tarflow: an apple/ml-tarflow Model checkpoint -> a biflow forward-flow checkpoint."""
from __future__ import annotations

from pathlib import Path

HELP = "turn an apple/ml-tarflow checkpoint into a biflow forward flow (stage 1), for stage 2, sampling and eval"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="ml-tarflow Model state dict (also {'model': ...} and DDP 'module.' keys)")
    p.add_argument("--out", type=Path, required=True, help="biflow forward-flow checkpoint to write (e.g. forward.pt)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: from the patches and patch size)")
    p.add_argument("--patch-size", type=int, default=None, help="patch side (default: inferred for 1- or 3-channel images)")
    p.add_argument("--in-channels", type=int, default=None, help="image channels (default: inferred with the patch size)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dimension (ml-tarflow fixes it at 64)")
    p.add_argument("--noise-std", type=float, default=0.05, help="sigma of the noise the model was trained with (x~ = x + sigma*eps)")
    p.add_argument("--data", type=Path, default=None, help="prepared data root (train/, test/) the flow models, recorded for eval and stage 2")


def run(args) -> int:
    from biflow.checkpoint import load_checkpoint
    from biflow.importers import import_tarflow

    out = import_tarflow(args.checkpoint, args.out, data_dir=args.data, image_size=args.image_size,
                         patch_size=args.patch_size, in_channels=args.in_channels, head_dim=args.head_dim,
                         noise_std=args.noise_std)
    cfg = load_checkpoint(out).cfg
    print(f"imported ml-tarflow {cfg.num_blocks} blocks x {cfg.layers_per_block} layers, width {cfg.width}, "
          f"{cfg.heads} heads, {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images, patch {cfg.patch_size}, "
          f"{cfg.num_classes or 'no'} classes -> {out}")
    print("log-det: biflow sums log|det J| over the C*H*W dimensions where ml-tarflow averages (ours = theirs x C*H*W)")
    return 0
