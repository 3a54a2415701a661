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

Layout: `<storage>/_sweeps/<space>-<hash>/run-<n>/` with sweep.json (state), tune/ (Tune's
experiment), trials/<trial id>/ (checkpoints, samples), ray_train/ (data-parallel trials) and
the report files. The hash covers the space file, the pipeline data and --num-samples, so
`--resume` finds the latest run of exactly this sweep.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from biflow.config import ConfigError, flatten, set_dotted
from biflow.errors import UserError
from biflow.pipeline.cache import Storage, digest
from biflow.pipeline.spec import load_pipeline, resolve_artifact_location, resolve_tracking_uri
from biflow.pipeline.tracking import RunRef, StepRun, Tracker
from biflow.sweep import tracking as sweep_tracking
from biflow.sweep.report import (REFERENCE_ID, ablation_table, best_pipeline, best_trial, mark_pareto, pareto_plot,
                                 rank_agreement, trials_csv, write_text)
from biflow.sweep.space import FORWARD_SECTIONS, Space, load_space
from biflow.sweep.tracking import KIND, STATUS, TrialRuns, children, start_run
from biflow.sweep.trial import FINAL, TrialSetup, run_trial, sampler_spec
from biflow.sweep.upstream import forward_checkpoint, resolve_upstream, step_context

TRAIN_DRIVER = "train_driver"  # custom resource of trials that only drive a Ray Train run (see ECOSYSTEM)
STATE = "sweep.json"


@dataclass
class SweepResult:
    name: str  # <space>-<hash>/run-<n>
    run_dir: Path
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # trials (+ the reference), as in trials.csv
    best: dict[str, Any] | None = None
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    upstream: dict[str, str] = field(default_factory=dict)  # step -> "cached" | "ran"

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["trial_id"] != REFERENCE_ID and r["status"] == status)


# ------------------------------------------------------------------ inputs
def raw_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Any, dict[str, Any]]:
    """(validated PipelineConfig, the file's raw data with the overrides applied): trials are built from the raw data,
    so a swept `size` still fills the fields the file leaves out."""
    cfg = load_pipeline(path, overrides)
    data = yaml.safe_load(Path(path).read_text()) or {}
    data = {k: {} if v is None else v for k, v in data.items()}
    for item in overrides:
        set_dotted(data, item)
    return cfg, data


def sweeps_root(storage: Storage) -> Path:
    return (Path(storage.root) if storage.is_local else storage.local_dir) / "_sweeps"


def _runs_of(sweep_dir: Path) -> list[Path]:
    runs = [p for p in sweep_dir.glob("run-*") if (p / STATE).is_file() and p.name[4:].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[4:]))


def _read_state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE).read_text())


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_text(run_dir / STATE, json.dumps(state, indent=1, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------- Ray
def connect(address: str | None) -> bool:
    """A local Ray (with the train_driver resource for data-parallel trials), or the cluster at `address`."""
    from biflow.pipeline.runner import connect_ray

    return connect_ray(address, resources={TRAIN_DRIVER: 64})


def check_sweep_storage(storage: Storage) -> None:
    """A sweep keeps Tune's state and trial checkpoints under the storage root, or, for an object-store root, on
    the driver's disk: several nodes then cannot share them, so that is refused rather than losing trials' work."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_local and len(nodes) > 1:
        raise UserError(f"pipeline.storage {storage.root}: a sweep on {len(nodes)} nodes needs a shared filesystem "
                        "root (an NFS path mounted everywhere); object-store roots work for `biflow run`, and for "
                        "sweeps on one machine")


def trial_resources(space: Space, cfg) -> tuple[dict[str, float], int]:
    """(Tune resources of one trial, how many fit at once)."""
    import ray

    total = ray.cluster_resources()
    cpus = total.get("CPU", 1.0)
    workers = cfg.train_reverse.num_workers
    if workers == 0:
        per = space.spec.cpus_per_trial
        fit = max(1, int(cpus // per))
        return {"cpu": per}, min(space.spec.max_concurrent or fit, fit)
    scaling = cfg.pipeline.train_reverse
    per_worker = scaling.resources_per_worker.get("CPU", 0 if scaling.use_gpu else 1)
    fit = max(1, int(cpus // max(per_worker * workers, 1e-9))) if per_worker else space.spec.max_concurrent or 1
    res = {"cpu": 0, TRAIN_DRIVER: 1} if total.get(TRAIN_DRIVER) else {"cpu": 0.01}
    return res, min(space.spec.max_concurrent or fit, fit)


def build_scheduler(space: Space, steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.spec.scheduler
    grace = min(s.grace_period or 2 * space.spec.report_every, s.max_t or steps)
    if s.type == "asha":  # stop_last_trials=False: a trial that reaches max_t still gets scored
        return ASHAScheduler(time_attr="step", metric=space.scheduler_metric, mode="min", max_t=s.max_t or steps, grace_period=grace,
                             reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=False)
    return FIFOScheduler()


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def trial_dirname(trial) -> str:
    return trial.trial_id


# ------------------------------------------------------------------- sweep
def run_sweep(space_path: str | Path, pipeline_path: str | Path, overrides: list[str] = (), num_samples: int | None = None,
              address: str | None = None, resume: bool = False, echo=print, listener=None) -> SweepResult:
    """Run (or resume) a sweep; returns its rows and files. Interrupted sweeps return with interrupted=True."""
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
    previous = _runs_of(sweep_dir)
    if resume and not previous:
        raise UserError(f"nothing to resume: no earlier run of {space_path} with this pipeline, these overrides and "
                        f"{n} samples under {sweep_dir}; run without --resume")
    tracker = Tracker(resolve_tracking_uri(cfg), cfg.pipeline.experiment, resolve_artifact_location(cfg))
    for old in previous:  # runs whose driver died (killed, machine lost) must not stay RUNNING in MLflow
        _close_if_dead(old, tracker)
    if resume:
        run_dir = previous[-1]
        lock = _hold(run_dir)
        if lock is None:
            raise UserError(f"{run_dir} is being run by another process right now; wait for it or stop it first")
        state = _read_state(run_dir)
        state["invocation"] = int(state.get("invocation", 1)) + 1
        parent = StepRun(RunRef(tracker.uri, tracker.experiment_id, state["parent_run_id"]))
        parent.client.update_run(parent.run_id, status="RUNNING")
        echo(f"sweep {sweep_id}/{run_dir.name}: resuming (invocation {state['invocation']}), MLflow parent run {parent.run_id}")
    else:
        run_dir = sweep_dir / f"run-{int(previous[-1].name[4:]) + 1 if previous else 1}"
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _hold(run_dir)
        parent = tracker.start_parent(f"sweep {space.name} {time.strftime('%Y-%m-%d %H:%M:%S')}", _parent_params(space, cfg, n),
                                      {KIND: "sweep", "biflow.sweep": f"{sweep_id}/{run_dir.name}", "biflow.space": str(space_path),
                                       "biflow.pipeline": str(pipeline_path), "mlflow.note.content": space.spec.description or "-"})
        state = {"parent_run_id": parent.run_id, "invocation": 1, "space": str(space_path), "pipeline": str(pipeline_path),
                 "overrides": list(overrides), "num_samples": n}
        echo(f"sweep {sweep_id}/{run_dir.name}: {space.num_trials(n)} trial(s) of {space_path.name} over {pipeline_path.name}; "
             f"MLflow {tracker.uri} (experiment {cfg.pipeline.experiment!r}, parent run {parent.run_id})")
    state.update(status="running", updated=time.time())
    _write_state(run_dir, state)
    name = f"{sweep_id}/{run_dir.name}"
    result = SweepResult(name, run_dir, parent.run_id)
    started = False
    try:
        started = connect(address or cfg.pipeline.ray_address)
        check_sweep_storage(storage)
        result = _run(space, cfg, base, n, storage, parent, run_dir, state, resume, result, echo, listener)
    except BaseException as err:
        _end_open_trials(parent, "interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        parent.set_tags({"biflow.error": f"{type(err).__name__}: {str(err)[:2000]}"})
        parent.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        _write_state(run_dir, {**state, "status": "interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                               "updated": time.time()})
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
        lock.close()  # releases the flock
    result.wall_s = time.perf_counter() - t0
    return result


def _hold(run_dir: Path):
    """An exclusive flock on the run directory while this process drives it (None: another process holds it)."""
    import fcntl

    fh = open(run_dir / "sweep.lock", "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _close_if_dead(run_dir: Path, tracker: Tracker) -> None:
    """A run whose state says running but whose lock is free lost its driver: end its MLflow runs KILLED."""
    try:
        state = _read_state(run_dir)
    except (OSError, ValueError):
        return
    if state.get("status") != "running":
        return
    lock = _hold(run_dir)
    if lock is None:  # alive in another process
        return
    try:
        parent = StepRun(RunRef(tracker.uri, tracker.experiment_id, state["parent_run_id"]))
        _end_open_trials(parent, "interrupted")
        if parent.client.get_run(parent.run_id).info.status == "RUNNING":
            parent.set_tags({"biflow.sweep.state": "driver died; resumable with --resume"})
            parent.client.set_terminated(parent.run_id, "KILLED")
        _write_state(run_dir, {**state, "status": "interrupted", "updated": time.time()})
    except Exception:  # noqa: BLE001 - a store we cannot reach or a deleted run: nothing to close
        pass
    finally:
        lock.close()


def _parent_params(space: Space, cfg, n: int) -> dict[str, Any]:
    params = flatten(cfg.model_dump(exclude={"pipeline"}))
    s = space.spec
    params.update({"sweep.metric": s.metric, "sweep.num_samples": n, "sweep.num_trials": space.num_trials(n),
                   "sweep.scheduler": s.scheduler.type, "sweep.scheduler.metric": space.scheduler_metric,
                   "sweep.steps": s.steps, "sweep.report_every": s.report_every, "sweep.seed": s.seed})
    params.update({f"sweep.axis.{p.name}": p.describe()[:500] for p in space.params})
    params.update({f"sweep.fixed.{k}": v for k, v in s.fixed.items()})
    return params


def _run(space: Space, cfg, base, n, storage: Storage, parent: StepRun, run_dir: Path, state: dict, resume: bool,
         result: SweepResult, echo, listener) -> SweepResult:
    import copy

    from ray import tune

    from biflow.pipeline.context import data_dir
    from biflow.pipeline.evaluation import metrics_cache

    driver_cfg = space.trial_config(base, {}, "sweep")  # the pipeline + the space's fixed settings
    exec_base = copy.deepcopy(base)
    exec_base.setdefault("pipeline", {})["storage"] = storage.root  # absolute: Ray workers change directory
    # 1. upstream steps, once (trials that change stage 1 resolve their own)
    upto = "train_forward" if uses_base_forward(space, base, driver_cfg) else "prepare"
    before = {k: v is not None for k, v in _cached(driver_cfg, storage, upto).items()}
    records = resolve_upstream(driver_cfg, storage, parent.ref, upto=upto, remote=True, echo=echo)
    result.upstream = {k: "cached" if before[k] else "ran" for k in records}
    parent.set_tags({f"biflow.upstream.{k}": f"{r['key']} ({result.upstream[k]}; run {r.get('mlflow_run_id') or '-'})"
                     for k, r in records.items()})
    echo("  upstream: " + ", ".join(f"{k} {v} ({records[k]['key']})" for k, v in result.upstream.items()))
    ctx = step_context(driver_cfg, storage, records, run_dir)
    # 2. the evaluator and reference statistics once, before trials load them in parallel
    _warm_metrics(driver_cfg, data_dir(ctx), metrics_cache(storage), echo)
    # 3. the exact inverse of the shared forward flow: a reference point (and the ablation's first row)
    exact_ref = None
    if space.spec.reference_exact and "train_forward" in records:
        exact_ref = _start_reference(space, driver_cfg, ctx, storage, run_dir, echo)
    # 4. the trials
    setup = TrialSetup(space=space, base=exec_base, storage_root=storage.root, local_dir=driver_cfg.pipeline.local_dir,
                       parent=parent.ref, trials_dir=str(run_dir / "trials"), ray_storage=str(run_dir / "ray_train"),
                       run_name=result.name.replace("/", "-"), threads=max(1, int(space.spec.cpus_per_trial)),
                       metrics_cache=str(metrics_cache(storage)))
    resources, concurrent = trial_resources(space, driver_cfg)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
    callback = TrialRuns(parent.ref, space, exec_base, str(run_dir / STATE), space.spec.metric)
    tune_path = run_dir / "tune"
    sweep_tracking.LISTENER = listener
    try:
        if resume and tune.Tuner.can_restore(str(tune_path)):
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            if resume:
                echo("  (no Tune state to restore yet: starting the trials)")
            tuner = tune.Tuner(
                trainable, param_space=space.param_space(),
                tune_config=tune.TuneConfig(
                    scheduler=build_scheduler(space, driver_cfg.train_reverse.steps), num_samples=n,
                    reuse_actors=True,
                    search_alg=_search(space, concurrent), trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name="tune", storage_path=str(run_dir), callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=0))
        echo(f"  trials: {space.num_trials(n)}, {concurrent} at once, {resources} each; "
             f"scheduler {space.spec.scheduler.type} on {space.scheduler_metric}")
        grid = tuner.fit()
    finally:
        sweep_tracking.LISTENER = None
    # 5. collect, time, report
    rows = _collect(grid, space, parent)
    reference = _finish_reference(exact_ref, space, driver_cfg, storage, run_dir, parent, echo)
    expected = space.num_trials(n)
    interrupted = any(r["status"] == "interrupted" for r in rows) or len(rows) < expected
    if interrupted:
        _end_open_trials(parent, "interrupted")
        done = sum(1 for r in rows if r["status"] in ("finished", "stopped_early", "failed"))
        parent.set_tags({"biflow.sweep.state": f"interrupted: {done} of {expected} trials done"})
        parent.end("KILLED")
        _write_state(run_dir, {**state, "status": "interrupted", "updated": time.time()})
        echo(f"sweep interrupted: {done} of {expected} trials done; continue with --resume")
        result.rows, result.interrupted = rows, True
        return result
    _time_samplers(rows, reference, driver_cfg, space, echo)
    if reference is not None:
        rows.append(reference)
    result.rows = rows
    _report(result, space, driver_cfg, base, parent, run_dir, Path(state["pipeline"]), echo)
    _write_state(run_dir, {**state, "status": "finished", "updated": time.time()})
    return result


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


def _search(space: Space, concurrent: int):
    """Grid and random search (Tune's variant generator), seeded; it also caps the trials running at once."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.spec.seed, max_concurrent=concurrent)


def _warm_metrics(cfg, ddir: Path, cache_dir: Path, echo) -> None:
    from biflow.data import load_split
    from biflow.metrics import Reference, get_feature_net, reference_stats

    ev = cfg.pipeline.evaluate
    reference = Reference.from_shardset(load_split(ddir, "train"), "train")
    net = get_feature_net(ev.features, inception_weights=ev.inception_weights, reference=reference, cache_dir=cache_dir,
                          device="cpu", log=lambda m: echo(f"  {m}"))
    reference_stats(reference, net, cache_dir)


# ------------------------------------------------------------- the reference
def _start_reference(space: Space, cfg, ctx, storage: Storage, run_dir: Path, echo):
    """The shared forward flow's exact sampler, scored once (a Ray task beside the trials); cached in the run dir."""
    import ray

    from biflow.pipeline.context import data_dir
    from biflow.pipeline.evaluation import score_sampler

    cached = run_dir / "exact.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    fwd_path, _ = forward_checkpoint(ctx)
    threads = max(1, int(space.spec.cpus_per_trial))
    spec = sampler_spec("exact", fwd_path, cfg, data_dir(ctx), storage, threads)
    echo(f"  reference: the exact inverse of forward flow {ctx.inputs['train_forward']['key']} "
         f"({cfg.pipeline.evaluate.num_samples} samples, beside the trials)")
    ref = ray.remote(score_sampler).options(num_cpus=threads, name="biflow:sweep-exact").remote(spec)
    return {"pending": ref, "checkpoint": str(fwd_path), "forward_key": ctx.inputs["train_forward"]["key"]}


def _finish_reference(ref, space: Space, cfg, storage, run_dir: Path, parent: StepRun, echo) -> dict[str, Any] | None:
    import ray

    from biflow.data import save_grid

    if ref is None:
        return None
    if "pending" in ref:
        res = ray.get(ref.pop("pending"))
        grid = res.pop("grid")
        save_grid(grid, run_dir / "samples_exact.png", nrow=int(len(grid) ** 0.5 + 0.999))
        metric = res["metric_name"]
        ref = {"trial_id": REFERENCE_ID, "label": "exact inverse", "status": "finished", "values": {},
               metric: res[metric], "nfe": res["nfe"], "class_acc": res["class_acc"], "checkpoint": ref["checkpoint"],
               "forward_key": ref["forward_key"], "ms_per_image_in_trial": res["ms_per_image"]}
        write_text(run_dir / "exact.json", json.dumps(ref, indent=1) + "\n")
    return dict(ref)


# ---------------------------------------------------------------- collecting
def _collect(grid, space: Space, parent: StepRun) -> list[dict[str, Any]]:
    """One row per Tune trial: status from its last result (and the MLflow run the callback kept)."""
    runs = {r.data.tags.get("biflow.trial_id"): r for r in children(parent.ref, "trial")}
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or Path(res.path).name
        run = runs.get(trial_id)
        tag = run.data.tags.get(STATUS) if run is not None else None
        if res.error is not None:
            status = "failed"
        elif m.get(FINAL):
            status = "finished"
        elif tag == "stopped_early":
            status = "stopped_early"
        else:
            status = "interrupted"
        metric = space.spec.metric
        values = (res.config or {}).get("params", {})
        rows.append({"trial_id": trial_id, "label": space.label(values), "status": status, "values": values,
                     metric: m.get(metric) if status == "finished" else None, "nfe": m.get("nfe"),
                     "class_acc": m.get("class_acc"), "val_recon": _last(run, "val_recon", m),
                     "val_fd": _last(run, "val_fd", m), "loss": _last(run, "loss", m),
                     "steps_trained": m.get("steps_trained", m.get("step")), "forward_key": m.get("forward_key"),
                     "checkpoint": m.get("checkpoint"), "run_id": run.info.run_id if run is not None else None,
                     "error": str(res.error)[:300] if res.error is not None else None})
    return sorted(rows, key=lambda r: r["trial_id"])


def _last(run, key: str, metrics: dict[str, Any]) -> float | None:
    if run is not None and key in run.data.metrics:
        return run.data.metrics[key]
    return metrics.get(key)


def _end_open_trials(parent: StepRun, why: str) -> None:
    """Child runs still RUNNING (trials, or pipeline steps the sweep ran, that did not finish) end KILLED;
    trial runs are tagged `why` (a resumed sweep reopens them)."""
    try:
        for run in children(parent.ref):
            if run.info.status == "RUNNING":
                if run.data.tags.get(KIND) == "trial":
                    StepRun(RunRef(parent.ref.uri, parent.ref.experiment_id, run.info.run_id)).set_tags({STATUS: why})
                parent.client.set_terminated(run.info.run_id, "KILLED")
    except Exception:  # noqa: BLE001 - cleanup on the way out must not hide the original error
        pass


# -------------------------------------------------------------------- timing
def _time_samplers(rows: list[dict], reference: dict | None, cfg, space: Space, echo, rounds: int = 3) -> None:
    """ms/image of every finished trial (and the reference), one sampler at a time in this process.

    The shared `time_sampler` (median of pipeline.evaluate.timing_repeats batches) runs `rounds` times,
    round-robin over the samplers, and each keeps its fastest round: load from other processes slows
    whichever sampler it happens to hit, and the minimum is the least disturbed measurement.
    """
    import torch

    from biflow.checkpoint import read_checkpoint
    from biflow.commands.eval import build_sampler
    from biflow.metrics import time_sampler
    from biflow.metrics.evaluate import balanced_labels
    from biflow.training.loop import resolve_device

    ev = cfg.pipeline.evaluate
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(ev.cpus)))
    device = resolve_device(ev.device)
    todo = [r for r in rows if r["status"] == "finished" and r.get("checkpoint")] + ([reference] if reference else [])
    echo(f"  timing {len(todo)} sampler(s) one at a time: batch {ev.timing_batch}, median of {ev.timing_repeats}, "
         f"best of {rounds} rounds, {max(1, int(ev.cpus))} thread(s)")
    try:
        draws = []
        for r in todo:
            path = Path(r["checkpoint"])
            sampler = "exact" if r["trial_id"] == REFERENCE_ID else "1nfe"
            fn, num_classes, nfe, _ = build_sampler(path, read_checkpoint(path), sampler, ev.guidance, True, ev.seed, device)

            def draw(b: int, fn=fn, num_classes=num_classes):
                y = balanced_labels(b, num_classes)
                return fn(b, None if y is None else torch.from_numpy(y))

            draws.append(draw)
            r["nfe"], r["ms_per_image"] = nfe, float("inf")
        for _ in range(rounds):
            for r, draw in zip(todo, draws):
                t = time_sampler(draw, ev.timing_batch, repeats=ev.timing_repeats, warmup=1, device=device)
                r["ms_per_image"] = min(r["ms_per_image"], t["ms_per_image"])
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------- report
def _report(result: SweepResult, space: Space, cfg, base: dict, parent: StepRun, run_dir: Path, pipeline_path: Path,
            echo) -> None:
    import matplotlib.pyplot as plt

    metric = space.spec.metric
    rows = result.rows
    mark_pareto(rows, metric)
    best = best_trial(rows, metric)
    result.best = best
    files: dict[str, Path] = {}
    title = f"{space.name}: {metric} vs ms/image ({sum(r['status'] == 'finished' for r in rows)} scored)"
    fig = pareto_plot(rows, metric, run_dir / "pareto.png", title)
    files["pareto"] = run_dir / "pareto.png"
    files["trials"] = write_text(run_dir / "trials.csv", trials_csv(rows, space, metric))
    agreement = rank_agreement(rows, metric, space.scheduler_metric)
    summary = {"sweep": result.name, "metric": metric, "best": best, "rows": rows,
               "counts": {s: result.count(s) for s in ("finished", "stopped_early", "failed")},
               "scheduler_metric": space.scheduler_metric, "scheduler_metric_spearman": agreement}
    if space.spec.table is not None:
        md, table_rows = ablation_table(space, rows, metric, cfg.data.name)
        files["table"] = write_text(run_dir / "ablation.md", md)
        summary["table"] = table_rows
    if best is not None:
        text = best_pipeline(space, base, best, metric, pipeline_path, result.name)
        files["best_pipeline"] = write_text(run_dir / "best_pipeline.yaml", text)
        load_pipeline(files["best_pipeline"])  # it must be runnable as written
    files["summary"] = write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    parent.log_figure(fig, "pareto.png")
    plt.close(fig)
    for key in ("trials", "table", "best_pipeline", "summary"):
        if key in files:
            parent.log_artifact(files[key])
    for png in (run_dir / "samples_exact.png",):
        if png.is_file():
            parent.log_artifact(png, "samples")
    _log_reference(parent, rows, metric)
    metrics = {f"trials/{s}": result.count(s) for s in ("finished", "stopped_early", "failed")}
    if agreement is not None:
        metrics["scheduler_metric_spearman"] = agreement
    if best is not None:
        metrics.update({f"best/{metric}": best[metric], "best/ms_per_image": best.get("ms_per_image")})
        parent.set_tags({"biflow.best_trial": best["trial_id"], "biflow.best_run": best.get("run_id") or "-"})
    for r in rows:  # the fair timing on each trial's run too
        if r.get("run_id") and r.get("ms_per_image") is not None:
            StepRun(RunRef(parent.ref.uri, parent.ref.experiment_id, r["run_id"])).log_metrics(
                {"ms_per_image": r["ms_per_image"], "pareto": float(bool(r.get("pareto")))})
    parent.log_metrics(metrics)
    parent.set_tags({"biflow.sweep.state": "finished"})
    parent.end("FINISHED")
    result.files = files
    echo(f"  finished {result.count('finished')}, stopped early {result.count('stopped_early')}, "
         f"failed {result.count('failed')}")
    if agreement is not None:
        echo(f"  rank agreement of {space.scheduler_metric} (last report) with {metric}: Spearman {agreement:+.2f}")
    if best is not None:
        echo(f"  best: trial {best['trial_id']} ({best['label']}): {metric} {best[metric]:.4g}, "
             f"{best.get('ms_per_image', float('nan')):.3g} ms/image -> {files['best_pipeline']}")
    if "table" in files:
        echo("")
        echo(files["table"].read_text())


def _log_reference(parent: StepRun, rows: list[dict], metric: str) -> None:
    """The exact inverse as its own child run (kind reference), so MLflow's compare view shows it beside the trials."""
    ref = next((r for r in rows if r["trial_id"] == REFERENCE_ID), None)
    if ref is None:
        return
    run = start_run(parent.ref, "exact inverse (reference)", {KIND: "reference", "biflow.forward_key": ref.get("forward_key")})
    run.log_params({"sampler": "exact", "forward_checkpoint": ref.get("checkpoint")})
    run.log_metrics({k: ref.get(k) for k in (metric, "ms_per_image", "nfe", "class_acc")})
    run.log_metrics({"pareto": float(bool(ref.get("pareto")))})
    run.end("FINISHED")


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

