"""biflow prepare: turn a dataset (built-in or a folder of images) into validated Parquet shards."""
from __future__ import annotations

from pathlib import Path

from biflow.cli import add_overrides
from biflow.config import ExperimentConfig, load_yaml

HELP = "convert a dataset into Parquet shards (train/ and test/)"


def add_arguments(p) -> None:
    p.add_argument("--config", type=Path, help="experiment YAML; its `data` section is used")
    add_overrides(p, "override a data setting, e.g. --set name=patches --set image_size=32")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def run(args) -> int:
    from biflow.data import load_split, prepare

    overrides = [f"data.{item}" for item in args.overrides]
    cfg = load_yaml(args.config, ExperimentConfig, overrides).data
    out = prepare(cfg, args.out)
    for split in ("train", "test"):
        s = load_split(out, split)
        print(f"{split}: {len(s.labels)} images of shape {s.images.shape[1:]}, {s.meta['num_classes']} classes, hash {s.content_hash[:12]}")
    print(f"shards in {out}")
    return 0
