"""biflow run: the whole experiment as a cached DAG of steps on Ray, every step recorded in MLflow."""
from __future__ import annotations

from pathlib import Path

from biflow.cli import add_overrides, add_ray_address

HELP = ("run a pipeline (prepare [-> latent] -> train_forward -> train_reverse -> evaluate -> report); "
        "cached steps are skipped")


def add_arguments(p) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline file, e.g. pipelines/digits.yaml")
    add_overrides(p, "override a setting, e.g. --set train_reverse.steps=300 (changes only the affected steps' keys)")
    p.add_argument("--force", action="append", default=[], metavar="STEP",
                   help="rerun STEP and everything downstream even if cached (repeatable)")
    add_ray_address(p)


def run(args) -> int:
    from biflow.pipeline.runner import run_pipeline
    from biflow.pipeline.spec import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    result = run_pipeline(cfg, args.force, args.address, label=args.pipeline.stem)
    total = sum(o.wall_s for o in result.outcomes if o.status == "ran")
    print(f"done: {len(result.ran)} step(s) ran ({total:.1f} s), "
          f"{len(result.outcomes) - len(result.ran)} cached; MLflow parent run {result.parent_run_id}")
    if result.report:
        print(f"report: {result.report}")
    return 0
