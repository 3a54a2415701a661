"""run_sweep: one command from a space file and a pipeline file to a comparison in MLflow.

    1. validate the pipeline and the space (every value a trial can take) before anything starts;
    2. open the sweep's MLflow parent run (or reopen it: --resume);
    3. connect to Ray; resolve prepare + train_forward through the pipeline cache (once, shared);
       train the evaluator / reference statistics once; start the exact-inverse reference (a Ray task);
    4. Tuner.fit (or Tuner.restore(...).fit() on --resume): one trial per sampled config, early
       stopping on the validation metric, one MLflow child run each (biflow.sweep.tracking);
    5. time every finished trial's sampler serially (fair ms/image), mark the Pareto front, write
       pareto.png, trials.csv, ablation.md (space files with a table), best_pipeline.yaml and
       summary.json, log them on the parent run, and end every run.

The reference of step 3 and step 5 live in biflow/sweep/results.py.

Layout: `<storage>/_sweeps/<space>-<hash>/run-<n>/` with sweep.json (state), tune/ (Tune's
experiment), trials/<trial id>/ (checkpoints, samples), ray_train/ (data-parallel trials) and
the report files. The hash covers the space file, the pipeline data and --num-samples, so
`--resume` finds the latest run of exactly this sweep.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biflow.config import ConfigError, apply_overrides, flatten
from biflow.errors import UserError
from biflow.pipeline.cache import Storage, digest
from biflow.pipeline.spec import load_pipeline_with_data, resolve_artifact_location, resolve_tracking_uri
from biflow.pipeline.tracking import RunRef, StepRun, Tracker
from biflow.sweep.results import (SweepResult, collect, end_open_trials, finish_reference, start_reference,
                                  time_samplers, write_report)
from biflow.sweep.loading import load_space
from biflow.sweep.space import FORWARD_SECTIONS, Space
from biflow.sweep.rundir import STATE, close_if_dead, hold, read_state, runs_of, sweeps_root, write_state
from biflow.sweep.tracking import KIND, TrialRuns
from biflow.sweep.trial import TrialSetup, run_trial
from biflow.sweep.tune_setup import (build_scheduler, check_sweep_storage, connect, search_algorithm, trial_dirname,
                                     trial_name, trial_resources)
from biflow.sweep.upstream import resolve_upstream, step_context



# ------------------------------------------------------------------ inputs
def raw_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
    """(validated PipelineConfig, the file's raw data with the overrides applied): trials are built from the raw data,
    so a swept `size` still fills the fields the file leaves out."""
    return load_pipeline_with_data(path, overrides)


# ------------------------------------------------------------------- sweep
@dataclass
class SweepRun:
    """One invocation of a sweep, as its steps see it: what it runs, where it records, how it reports."""

    space: Space
    base: dict[str, Any]  # the pipeline's raw data with the overrides: trials are built from it
    num_samples: int
    storage: Storage
    parent: StepRun  # the sweep's MLflow parent run
    run_dir: Path  # <storage>/_sweeps/<space>-<hash>/run-<n>
    state: dict[str, Any]  # what sweep.json holds
    resume: bool
    result: SweepResult
    echo: Callable[[str], None] = print
    listener: Callable[[str, Any], None] | None = None  # TrialRuns' hook, called after each trial event

    @property
    def num_trials(self) -> int:
        return self.space.num_trials(self.num_samples)

    def save_state(self, status: str) -> None:
        write_state(self.run_dir, {**self.state, "status": status, "updated": time.time()})


def run_sweep(space_path: str | Path, pipeline_path: str | Path, overrides: list[str] = (), num_samples: int | None = None,
              address: str | None = None, resume: bool = False, echo=print, listener=None) -> SweepResult:
    """Run (or resume) a sweep; returns its rows and files. Interrupted sweeps return with interrupted=True.

    `listener(event, trial)` is called after each trial event ("start", "complete", "error") of the trials this call
    starts (tests use it to interrupt a sweep); a resumed Tuner's callbacks come from its saved state, without it.
    """
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status table every few seconds
    pipeline_path, space_path = Path(pipeline_path), Path(space_path)
    cfg, base = raw_pipeline(pipeline_path, list(overrides))
    space = load_space(space_path, base)
    n = num_samples or space.spec.num_samples
    if n < 1:
        raise ConfigError("--num-samples must be at least 1")
    if cfg.pipeline.latent:
        raise UserError("pipeline.latent: sweeps run in pixel space only (a trial's validation compares pixels); "
                        "run latent-space pipelines with `biflow run`")
    from biflow.pipeline.runner import storage_for

    storage = storage_for(cfg)
    storage.check_writable()
    sweep_id = f"{space.name}-{digest({'space': space.raw, 'pipeline': base, 'num_samples': n})[:10]}"
    sweep_dir = sweeps_root(storage) / sweep_id
    previous = runs_of(sweep_dir)
    if resume and not previous:
        raise UserError(f"nothing to resume: no earlier run of {space_path} with this pipeline, these overrides and "
                        f"{n} samples under {sweep_dir}; run without --resume")
    tracker = Tracker(resolve_tracking_uri(cfg), cfg.pipeline.experiment, resolve_artifact_location(cfg))
    for old in previous:  # runs whose driver died (killed, machine lost) must not stay RUNNING in MLflow
        close_if_dead(old, tracker)
    if resume:
        run_dir, lock, parent, state = _reopen(previous[-1], tracker, echo)
    else:
        run_dir = sweep_dir / f"run-{int(previous[-1].name[4:]) + 1 if previous else 1}"
        state = {"space": str(space_path), "pipeline": str(pipeline_path), "overrides": list(overrides), "num_samples": n}
        lock, parent = _start(run_dir, tracker, space, cfg, state, echo)
    run = SweepRun(space, base, n, storage, parent, run_dir, state, resume,
                   SweepResult(f"{sweep_id}/{run_dir.name}", run_dir, parent.run_id), echo, listener)
    run.save_state("running")
    started = False
    try:
        started = connect(address or cfg.pipeline.ray_address)
        check_sweep_storage(storage)
        result = _run(run)
    except BaseException as err:
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        end_open_trials(parent, why)
        parent.set_tags({"biflow.error": f"{type(err).__name__}: {str(err)[:2000]}"})
        parent.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        run.save_state(why)
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
        lock.close()  # releases the flock
    result.wall_s = time.perf_counter() - t0
    return result


def _start(run_dir: Path, tracker: Tracker, space: Space, cfg, state: dict[str, Any], echo) -> tuple[Any, StepRun]:
    """A new run directory, held, and its MLflow parent run (recorded in `state`): (lock, parent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = hold(run_dir)
    name, n = f"{run_dir.parent.name}/{run_dir.name}", state["num_samples"]
    parent = tracker.start_parent(f"sweep {space.name} {time.strftime('%Y-%m-%d %H:%M:%S')}", _parent_params(space, cfg, n),
                                  {KIND: "sweep", "biflow.sweep": name, "biflow.space": state["space"],
                                   "biflow.pipeline": state["pipeline"], "mlflow.note.content": space.spec.description or "-"})
    state.update(parent_run_id=parent.run_id, invocation=1)
    echo(f"sweep {name}: {space.num_trials(n)} trial(s) of {space.path.name} over {Path(state['pipeline']).name}; "
         f"MLflow {tracker.uri} (experiment {cfg.pipeline.experiment!r}, parent run {parent.run_id})")
    return lock, parent


def _reopen(run_dir: Path, tracker: Tracker, echo) -> tuple[Path, Any, StepRun, dict[str, Any]]:
    """An earlier run, held again, its parent run RUNNING again: (run_dir, lock, parent, state)."""
    lock = hold(run_dir)
    if lock is None:
        raise UserError(f"{run_dir} is being run by another process right now; wait for it or stop it first")
    state = read_state(run_dir)
    state["invocation"] = int(state.get("invocation", 1)) + 1
    parent = StepRun(RunRef(tracker.uri, tracker.experiment_id, state["parent_run_id"]))
    parent.client.update_run(parent.run_id, status="RUNNING")
    echo(f"sweep {run_dir.parent.name}/{run_dir.name}: resuming (invocation {state['invocation']}), "
         f"MLflow parent run {parent.run_id}")
    return run_dir, lock, parent, state


def _parent_params(space: Space, cfg, n: int) -> dict[str, Any]:
    params = flatten(cfg.model_dump(exclude={"pipeline"}))
    s = space.spec
    params.update({"sweep.metric": s.metric, "sweep.num_samples": n, "sweep.num_trials": space.num_trials(n),
                   "sweep.scheduler": s.scheduler.type, "sweep.scheduler.metric": space.scheduler_metric,
                   "sweep.steps": s.steps, "sweep.report_every": s.report_every, "sweep.seed": s.seed})
    params.update({f"sweep.axis.{p.name}": p.describe()[:500] for p in space.params})
    params.update({f"sweep.fixed.{k}": v for k, v in s.fixed.items()})
    return params


def _run(run: SweepRun) -> SweepResult:
    """The sweep on a connected Ray: shared upstream steps, the trials, then the report."""
    from biflow.pipeline.context import data_dir
    from biflow.pipeline.evaluation import metrics_cache
    from biflow.sampling.scoring import warm_reference

    driver_cfg = run.space.trial_config(run.base, {}, "sweep")  # the pipeline + the space's fixed settings
    ctx, records = _resolve_upstream(run, driver_cfg)
    # the evaluator and reference statistics once, before trials load them in parallel
    ev = driver_cfg.pipeline.evaluate
    warm_reference(data_dir(ctx), ev.features, ev.inception_weights, metrics_cache(run.storage),
                   log=lambda m: run.echo(f"  {m}"), max_reference=ev.max_reference)
    exact_ref = None  # the shared forward flow's exact inverse: a reference point (and the ablation's first row)
    if run.space.spec.reference_exact and "train_forward" in records:
        exact_ref = start_reference(run.space, driver_cfg, ctx, run.storage, run.run_dir, run.echo)
    grid = _fit_trials(run, driver_cfg)
    rows = collect(grid, run.space, run.parent)
    reference = finish_reference(exact_ref, run.space, driver_cfg, run.storage, run.run_dir, run.parent, run.echo)
    if any(r["status"] == "interrupted" for r in rows) or len(rows) < run.num_trials:
        return _interrupted(run, rows)
    time_samplers(rows, reference, driver_cfg, run.space, run.echo)
    run.result.rows = rows + ([reference] if reference is not None else [])
    write_report(run.result, run.space, driver_cfg, run.base, run.parent, run.run_dir, Path(run.state["pipeline"]), run.echo)
    run.save_state("finished")
    return run.result


def _resolve_upstream(run: SweepRun, driver_cfg) -> tuple[Any, dict[str, dict]]:
    """prepare (and train_forward when some trial keeps the pipeline's stage 1) through the pipeline cache, once:
    (the step context of the trials' shared inputs, the upstream records)."""
    upto = "train_forward" if uses_base_forward(run.space, run.base, driver_cfg) else "prepare"
    before = {k: v is not None for k, v in _cached(driver_cfg, run.storage, upto).items()}
    records = resolve_upstream(driver_cfg, run.storage, run.parent.ref, upto=upto, remote=True, echo=run.echo)
    upstream = run.result.upstream = {k: "cached" if before[k] else "ran" for k in records}
    run.parent.set_tags({f"biflow.upstream.{k}": f"{r['key']} ({upstream[k]}; run {r.get('mlflow_run_id') or '-'})"
                         for k, r in records.items()})
    run.echo("  upstream: " + ", ".join(f"{k} {v} ({records[k]['key']})" for k, v in upstream.items()))
    return step_context(driver_cfg, run.storage, records, run.run_dir), records


def _fit_trials(run: SweepRun, driver_cfg):
    """The trials on Ray Tune (restored on --resume when Tune saved its state): their ResultGrid."""
    from ray import tune

    from biflow.pipeline.evaluation import metrics_cache

    exec_base = copy.deepcopy(run.base)
    apply_overrides(exec_base, {"pipeline.storage": run.storage.root}, "sweep")  # absolute: Ray workers change directory
    setup = TrialSetup(space=run.space, base=exec_base, storage_root=run.storage.root, local_dir=driver_cfg.pipeline.local_dir,
                       parent=run.parent.ref, trials_dir=str(run.run_dir / "trials"), ray_storage=str(run.run_dir / "ray_train"),
                       run_name=run.result.name.replace("/", "-"), threads=max(1, int(run.space.spec.cpus_per_trial)),
                       metrics_cache=str(metrics_cache(run.storage)))
    resources, concurrent = trial_resources(run.space, driver_cfg)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
    tune_path = run.run_dir / "tune"
    if run.resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if run.resume:
            run.echo("  (no Tune state to restore yet: starting the trials)")
        callback = TrialRuns(run.parent.ref, run.space, exec_base, str(run.run_dir / STATE), run.space.spec.metric,
                             listener=run.listener)
        tuner = tune.Tuner(
            trainable, param_space=run.space.param_space(),
            tune_config=tune.TuneConfig(
                scheduler=build_scheduler(run.space, driver_cfg.train_reverse.steps), num_samples=run.num_samples,
                reuse_actors=True, search_alg=search_algorithm(run.space, concurrent), trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name="tune", storage_path=str(run.run_dir), callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0))
    run.echo(f"  trials: {run.num_trials}, {concurrent} at once, {resources} each; "
             f"scheduler {run.space.spec.scheduler.type} on {run.space.scheduler_metric}")
    return tuner.fit()


def _interrupted(run: SweepRun, rows: list[dict[str, Any]]) -> SweepResult:
    """Some trials did not finish (Ctrl-C, SIGUSR1): end the open runs KILLED, keep the state for --resume."""
    end_open_trials(run.parent, "interrupted")
    done = sum(1 for r in rows if r["status"] in ("finished", "stopped_early", "failed"))
    run.parent.set_tags({"biflow.sweep.state": f"interrupted: {done} of {run.num_trials} trials done"})
    run.parent.end("KILLED")
    run.save_state("interrupted")
    run.echo(f"sweep interrupted: {done} of {run.num_trials} trials done; continue with --resume")
    run.result.rows, run.result.interrupted = rows, True
    return run.result


def uses_base_forward(space: Space, base: dict[str, Any], driver_cfg) -> bool:
    """Whether some trial keeps the pipeline's stage 1: then the driver resolves it once (and scores its exact inverse).

    False when an axis that touches forward keys is continuous, or none of its values leaves them alone.
    """
    sections = ("forward", "train_forward")
    want = {s: getattr(driver_cfg, s).model_dump() for s in sections}
    for p in space.params:
        if not any(k.startswith(FORWARD_SECTIONS) for k in p.keys):
            continue
        if not p.is_discrete:
            return False
        if not any({s: getattr(space.trial_config(base, {p.name: v}), s).model_dump() for s in sections} == want
                   for v in p.values):
            return False
    return True


def _cached(cfg, storage: Storage, upto: str) -> dict[str, Any]:
    from biflow.sweep.upstream import upstream_plan

    return {p.name: p.record for p in upstream_plan(cfg, storage, upto)}


def describe(space: Space, base: dict[str, Any], n: int | None = None) -> str:
    """A few lines about the space (for `biflow sweep --dry-run`)."""
    s = space.spec
    shared = uses_base_forward(space, base, space.trial_config(base, {}, "sweep"))
    stage1 = ("shared" if not space.changes_forward else "shared, plus one per distinct forward setting") if shared \
        else "one per distinct forward setting (trained in the trials, cached)"
    lines = [f"{space.path}: {space.num_trials(n)} trial(s) = grid {space.grid_size()} x num_samples {n or s.num_samples}",
             f"  metric {s.metric}; scheduler {s.scheduler.type} on {space.scheduler_metric}; steps {s.steps or '(pipeline)'}, "
             f"report every {s.report_every}; stage 1: {stage1}"]
    lines += [f"  {p.describe()}" for p in space.params]
    if s.fixed:
        lines.append("  fixed: " + ", ".join(f"{k}={v!r}" for k, v in s.fixed.items()))
    return "\n".join(lines)

