"""biflow train: train the forward flow (stage 1) from an experiment config; reruns resume."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from biflow.config import ExperimentConfig, load_yaml

HELP = "train stage 1 (forward flow) from an experiment YAML; rerunning resumes from the checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--config", type=Path, help="experiment YAML (defaults: digits demo settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train_forward.steps=500")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint: OUT/forward.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def print_log(step: int, metrics: dict) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
    tqdm.write(f"step {step}: {shown}")


def run(args) -> int:
    from biflow.training.forward import train_forward

    cfg = load_yaml(args.config, ExperimentConfig, args.overrides)
    trainer, ckpt = train_forward(cfg, args.out, on_log=print_log, progress=not args.no_progress)
    print(f"forward flow: {trainer.step} steps, checkpoint {ckpt}")
    return 0
