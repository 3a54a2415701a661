"""biflow sweep: Ray Tune over how the reverse model is trained (or the whole model), recorded in MLflow."""
from __future__ import annotations

from pathlib import Path

from biflow.cli import add_overrides, add_ray_address

HELP = "sweep a search space (tune_spaces/*.yaml) over a pipeline with Ray Tune; FID/FD vs ms/image and the Pareto front in MLflow"


def add_arguments(p) -> None:
    p.add_argument("space", type=Path, help="search-space file, e.g. tune_spaces/inverse_loss.yaml")
    p.add_argument("--pipeline", type=Path, required=True, help="pipeline file whose upstream steps the trials share, "
                   "e.g. pipelines/digits.yaml")
    add_overrides(p, "override a pipeline setting for the whole sweep, e.g. --set train_forward.steps=600")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="Tune num_samples (repeats of the grid, draws of the random axes); default: the space file's")
    add_ray_address(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the latest interrupted run of this sweep (Tuner.restore); finished trials are kept")
    p.add_argument("--dry-run", action="store_true", help="validate the space against the pipeline, print the trials, run nothing")


def run(args) -> int:
    from biflow.sweep.runner import describe, raw_pipeline, run_sweep
    from biflow.sweep.loading import load_space

    if args.dry_run:
        _, base = raw_pipeline(args.pipeline, args.overrides)
        space = load_space(args.space, base)
        print(describe(space, base, args.num_samples))
        print("ok: every value of every axis gives a valid trial config")
        return 0
    result = run_sweep(args.space, args.pipeline, args.overrides, args.num_samples, args.address, args.resume)
    if result.interrupted:
        print(f"interrupted: rerun with --resume to finish the remaining trials ({result.run_dir})")
        return 130
    print(f"done in {result.wall_s:.0f} s: {result.count('finished')} finished, {result.count('stopped_early')} stopped early, "
          f"{result.count('failed')} failed; MLflow parent run {result.parent_run_id}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0
