"""biflow train: train stage 1 (forward flow) or stage 2 (reverse model) from an experiment config; reruns resume."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from biflow.cli import add_overrides
from biflow.config import ExperimentConfig, load_yaml
from biflow.errors import UserError

HELP = "train stage 1 (forward flow) or stage 2 (reverse model); rerunning resumes from the checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--stage", choices=("forward", "reverse"), default="forward",
                   help="forward: OUT/forward.pt; reverse: OUT/reverse.pt against --forward")
    p.add_argument("--forward", type=Path, help="stage 2: the trained forward checkpoint (default: OUT/forward.pt)")
    p.add_argument("--config", type=Path, help="experiment YAML (defaults: digits demo settings)")
    add_overrides(p, "override a setting, e.g. --set train_forward.steps=500 --set reverse_loss.strategy=naive_distillation")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def print_log(step: int, metrics: dict) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
    tqdm.write(f"step {step}: {shown}")


def run(args) -> int:
    from biflow.checkpoint import read_checkpoint
    from biflow.data import prepare
    from biflow.training.stages import train_stage_into

    cfg = load_yaml(args.config, ExperimentConfig, args.overrides)
    forward = None
    if args.stage == "forward":
        data_dir = prepare(cfg.data, args.out / "data")
    else:
        forward = args.forward or args.out / "forward.pt"
        if not forward.is_file():
            raise UserError(f"{forward}: no forward checkpoint; train stage 1 first or pass --forward")
        data_dir = read_checkpoint(forward).get("data_dir")
        if not data_dir:  # e.g. a flow imported without --data
            raise UserError(f"{forward}: records no training data; pass it when importing (biflow import-tarflow --data DIR)")
    trainer, ckpt = train_stage_into(args.stage, cfg, args.out, data_dir, forward, on_log=print_log,
                                     progress=not args.no_progress)
    print(f"{args.stage}: {trainer.step} steps, checkpoint {ckpt}")
    return 0
