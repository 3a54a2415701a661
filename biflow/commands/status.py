"""biflow status: which steps of a pipeline are cached and which would run (no Ray, no MLflow needed)."""
from __future__ import annotations

from pathlib import Path

from biflow.cli import add_overrides

HELP = "show which steps of a pipeline are cached and which would run"


def add_arguments(p) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline file, e.g. pipelines/digits.yaml")
    add_overrides(p, "the same overrides you would pass to `biflow run`")
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="as `biflow run --force`")


def run(args) -> int:
    from biflow.pipeline.runner import plan, print_plan, storage_for
    from biflow.pipeline.spec import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    storage = storage_for(cfg)
    steps = plan(cfg, storage, args.force)
    print(f"pipeline {args.pipeline.stem}: storage {storage.root}")
    if cfg.pipeline.note:
        print(f"note: {cfg.pipeline.note.strip()}")
    print_plan(steps, storage)
    todo = [p.name for p in steps if p.will_run]
    print(f"{len(todo)} step(s) would run" + (f": {', '.join(todo)}" if todo else " (everything is cached)"))
    return 0
