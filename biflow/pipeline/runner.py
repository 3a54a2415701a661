"""The DAG runner: plan from the cache, run the missing steps as Ray tasks in dependency order, track in MLflow.

`plan` needs neither Ray nor MLflow: it computes every step's key from the config (and its inputs'
keys) and looks for done records; `biflow status` prints it. `run_pipeline` connects to Ray, opens
the MLflow parent run, gives every cached step a child run that links to the run that produced it,
and submits one Ray task per step to run, each receiving its inputs' records as task arguments (so
Ray starts it only once they exist). A task locks its (step, key), looks for a record once more (a
concurrent run may have finished it meanwhile), runs the step, publishes its outputs and writes the
record last.
"""
from __future__ import annotations

import os
import platform
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from biflow.config import ConfigError, flatten
from biflow.errors import UserError, first_line
from biflow.pipeline.cache import Storage, code_version, step_key
from biflow.pipeline.ray_session import check_local_gpus, connect_ray, ray_node_id
from biflow.pipeline.spec import (PipelineConfig, resolve_artifact_location, resolve_storage,
                                  resolve_tracking_uri)
from biflow.pipeline.context import StepContext
from biflow.pipeline.steps import ORDER, STEPS, active_steps, downstream
from biflow.pipeline.tracking import RunRef, StepRun, Tracker, start_child


TASK_RETRIES = 2  # a step whose process dies (OOM, lost node) runs again and resumes from its checkpoints


class StepFailed(UserError):
    """A step raised; the message names it and gives the first line of the cause."""


@dataclass
class Planned:
    name: str
    key: str
    inputs: dict[str, str]  # upstream step -> key
    config: dict[str, Any]
    code: str
    record: dict[str, Any] | None  # done record when cached
    action: str  # "cached" | "run" | "force"

    @property
    def will_run(self) -> bool:
        return self.action != "cached"

    def payload(self, cfg: PipelineConfig, storage: Storage, parent: RunRef | None) -> dict[str, Any]:
        """What `execute_step` needs to run this step (picklable; its inputs' records come as further arguments)."""
        return {"name": self.name, "key": self.key, "config": cfg.model_dump(), "storage": storage.root,
                "local_dir": cfg.pipeline.local_dir, "parent": parent, "force": self.action == "force",
                "inputs": self.inputs, "step_config": self.config, "code": self.code}


@dataclass
class Outcome:
    name: str
    status: str  # cached | ran | cached (concurrent run) | failed | skipped
    wall_s: float
    key: str
    record: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class PipelineResult:
    outcomes: list[Outcome] = field(default_factory=list)
    parent_run_id: str | None = None
    report: str | None = None  # the report.md location

    @property
    def ran(self) -> list[str]:
        return [o.name for o in self.outcomes if o.status == "ran"]


# --------------------------------------------------------------------------- plan
def check_force(force: list[str], cfg: PipelineConfig) -> set[str]:
    steps = active_steps(cfg)
    unknown = [f for f in force if f not in steps]
    if unknown:
        why = "not a step of this pipeline" if unknown[0] in STEPS else "unknown step"
        raise ConfigError(f"--force {unknown[0]}: {why}; steps are {', '.join(steps)}")
    return set(force)


def plan(cfg: PipelineConfig, storage: Storage, force: list[str] = ()) -> list[Planned]:
    """Every step of this pipeline in dependency order with its key and whether it is cached or would run."""
    forced = downstream(check_force(list(force), cfg))
    keys: dict[str, str] = {}
    out = []
    for name in active_steps(cfg):
        step = STEPS[name]
        config, code = step.config(cfg), code_version(step.run)  # the sources `run` imports
        inputs = {i: keys[i] for i in step.inputs if i in keys}  # an input step the pipeline lacks is not an input
        keys[name] = key = step_key(name, config, inputs, code)
        record = None if name in forced else storage.read_record(name, key)
        action = "force" if name in forced else ("cached" if record is not None else "run")
        out.append(Planned(name, key, inputs, config, code, record, action))
    return out


def storage_for(cfg: PipelineConfig) -> Storage:
    return Storage(resolve_storage(cfg), cfg.pipeline.local_dir)


# ------------------------------------------------------------------------- tasks
def execute_step(payload: dict[str, Any], *upstream: dict[str, Any]) -> dict[str, Any]:
    """The body of one step's Ray task (also callable directly): lock, re-check, run, publish, record.

    upstream: the inputs' outcomes, each {"record": done record, ...} (Ray resolves upstream tasks' results).
    Returns {"status": "ran" | "cached (concurrent run)", "record": ..., "wall_s": ...}.
    """
    import shutil

    t0, c0 = time.perf_counter(), time.process_time()
    name, key = payload["name"], payload["key"]
    cfg = PipelineConfig.model_validate(payload["config"])
    storage = Storage(payload["storage"], payload["local_dir"])
    step = STEPS[name]
    inputs = {u["record"]["step"]: u["record"] for u in upstream}
    with storage.lock(name, key):
        record = None if payload["force"] else storage.read_record(name, key)
        if record is not None:  # a concurrent run of the same config finished it while we waited for the lock
            return {"status": "cached (concurrent run)", "record": record, "wall_s": time.perf_counter() - t0}
        parent: RunRef | None = payload["parent"]
        tags = {"biflow.key": key, "biflow.cache": "miss", "biflow.host": socket.gethostname(), "biflow.pid": os.getpid(),
                "biflow.ray_node": ray_node_id()}
        run = start_child(parent, name, tags) if parent is not None else None
        try:
            if run is not None:
                run.log_params(flatten(payload["step_config"]))
            work = storage.work_dir(name, key)
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)  # staged outputs of a crashed attempt; checkpoints stay in `work`
            out.mkdir(parents=True)
            ctx = StepContext(name, key, cfg, storage, inputs, run, work, out)
            print(f"[{name}] started (key {key})", flush=True)
            result = step.run(ctx)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 + result.pop("child_cpu_s", 0.0)  # CPU seconds, all threads (and fan-out tasks)
            record = storage.publish(name, key, out, {
                "inputs": payload["inputs"], "config": payload["step_config"], "code": payload["code"], "result": result,
                "mlflow_run_id": run.run_id if run else None, "mlflow_experiment_id": parent.experiment_id if parent else None,
                "wall_s": wall, "cpu_s": cpu, "host": socket.gethostname(), "python": platform.python_version()})
            storage.discard_work(name, key)
            if run is not None:
                run.log_metrics({"step/wall_s": wall, "step/cpu_s": cpu})
                run.end("FINISHED")
        except BaseException:
            if run is not None:
                run.set_tags({"biflow.error": traceback.format_exc(limit=3)[-4000:]})
                run.end("FAILED")
            raise
    return {"status": "ran", "record": record, "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------ running
def _row(o: Outcome) -> str:
    cpu = (o.record or {}).get("cpu_s") if o.status == "ran" else None
    cpu = f"{cpu:8.1f} s" if cpu is not None else " " * 10
    return f"  {o.name:<14} {o.status:<24} {o.wall_s:8.1f} s {cpu}   {o.key}"


def run_pipeline(cfg: PipelineConfig, force: list[str] = (), address: str | None = None, label: str = "pipeline",
                 echo=print) -> PipelineResult:
    """Run the pipeline: cached steps are skipped, the rest run as Ray tasks; raises StepFailed on a failure."""
    check_force(list(force), cfg)
    storage = storage_for(cfg)
    storage.check_writable()
    tracker = Tracker(resolve_tracking_uri(cfg), cfg.pipeline.experiment, resolve_artifact_location(cfg))
    steps = plan(cfg, storage, force)
    needs_ray = any(p.will_run for p in steps)  # a fully cached pipeline needs no cluster at all
    address = address or cfg.pipeline.ray_address or os.environ.get("RAY_ADDRESS")
    started = connect_ray(address) if needs_ray else False
    if needs_ray:
        import ray

        from biflow.cluster.storage import check_cluster

        check_cluster(storage.root, tracker.uri)  # multi-node: node-local storage or sqlite is a one-line error
        if started:  # a local Ray cannot grow: GPU tasks on a machine without one would wait forever
            check_local_gpus(cfg, [p.name for p in steps if p.will_run], ray.cluster_resources().get("GPU", 0))
    result = PipelineResult()
    parent = tracker.start_parent(f"{label} {time.strftime('%Y-%m-%d %H:%M:%S')}", flatten(cfg),
                                  {"biflow.pipeline": label, "biflow.storage": storage.root,
                                   "biflow.force": ",".join(force) or "-", "biflow.keys": " ".join(f"{p.name}={p.key}" for p in steps),
                                   "biflow.ray": ray.get_runtime_context().gcs_address if needs_ray else "-"})
    result.parent_run_id = parent.run_id
    echo(f"pipeline {label}: storage {storage.root}; MLflow {tracker.uri} (experiment {cfg.pipeline.experiment!r}, "
         f"run {parent.run_id})")
    echo(f"  {'step':<14} {'status':<24} {'wall':>10} {'cpu':>10}   key")
    try:
        refs: dict[str, Any] = {}
        pending: dict[Any, Planned] = {}
        t_submit: dict[str, float] = {}
        for p in steps:
            if not p.will_run:
                _log_cache_hit(tracker, parent, p)
                refs[p.name] = {"record": p.record}
                o = Outcome(p.name, "cached", 0.0, p.key, p.record)
                result.outcomes.append(o)
                echo(_row(o))
                continue
            task = ray.remote(execute_step).options(name=f"biflow:{p.name}", max_retries=TASK_RETRIES,
                                                   **STEPS[p.name].resources(cfg))
            ref = task.remote(p.payload(cfg, storage, parent.ref), *[refs[i] for i in p.inputs])
            refs[p.name] = ref
            pending[ref] = p
            t_submit[p.name] = time.perf_counter()
        failure = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout keeps Ctrl-C responsive
            if not done:
                continue
            p = pending.pop(done[0])
            try:
                out = ray.get(done[0])
                o = Outcome(p.name, out["status"], out["wall_s"], p.key, out["record"])
                if out["status"] != "ran":
                    _log_cache_hit(tracker, parent, p, out["record"])
            except Exception as err:  # the step raised (or an upstream step did)
                cause = first_line(err)
                upstream = failure is not None
                o = Outcome(p.name, "skipped (upstream failed)" if upstream else "failed",
                            time.perf_counter() - t_submit[p.name], p.key, error=cause)
                failure = failure or o
            result.outcomes.append(o)
            echo(_row(o))
        result.outcomes.sort(key=lambda o: ORDER.index(o.name))
        if failure is not None:
            parent.set_tags({"biflow.failed_step": failure.name})
            raise StepFailed(f"step {failure.name} failed: {failure.error}")
        _finish_parent(tracker, parent, storage, result)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracker.end_open_children(parent, status)
        parent.end(status)
        raise
    finally:
        if started:
            ray.shutdown()
    return result


def _log_cache_hit(tracker: Tracker, parent: StepRun, p: Planned, record: dict[str, Any] | None = None) -> None:
    """A child run for a step served from the cache: tagged as a hit, linked to the run that produced it."""
    record = record or p.record
    source = record.get("mlflow_run_id")
    run = start_child(parent.ref, p.name, {
        "biflow.key": p.key, "biflow.cache": "hit", "biflow.source_run_id": source or "-",
        "mlflow.note.content": f"Cache hit: outputs produced by run [{source}]({tracker.run_link(source)})" if source else "Cache hit"})
    run.log_params(flatten(p.config))
    run.log_metrics({k: v for k, v in (record.get("result", {}).get("metrics") or {}).items()}, flush=False)
    run.log_metrics({"step/wall_s": 0.0})
    run.end("FINISHED")


def _finish_parent(tracker: Tracker, parent: StepRun, storage: Storage, result: PipelineResult) -> None:
    """Summary metrics (from every step's record) and the report on the parent run."""
    metrics: dict[str, float] = {}
    for o in result.outcomes:
        metrics.update((o.record or {}).get("result", {}).get("metrics") or {})
        metrics[f"step/{o.name}/wall_s"] = o.wall_s
    parent.log_metrics(metrics)
    report = next((o for o in result.outcomes if o.name == "report"), None)
    if report is not None and report.record is not None:
        d = storage.fetch("report", report.key)
        for name in ("report.md", "report.json", "fid_vs_speed.png"):
            if (d / name).is_file():
                parent.log_artifact(d / name)
        result.report = str(d / "report.md") if storage.is_local else storage.uri("report", report.key, "report.md")
    parent.set_tags({"biflow.ran": ",".join(result.ran) or "-"})
    tracker.end_open_children(parent, "KILLED")  # attempts whose process died before Ray ran them again
    parent.end("FINISHED")


def print_plan(steps: list[Planned], storage: Storage, echo=print) -> None:
    echo(f"  {'step':<14} {'status':<28} {'key':<17} produced")
    for p in steps:
        if p.action == "cached":
            rec = p.record
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.get("published", 0)))
            status, info = "cached", f"{when}, {rec.get('wall_s', 0):.1f} s, MLflow run {rec.get('mlflow_run_id') or '-'}"
        else:
            status = "running in another process" if storage.locked_by_other(p.name, p.key) else (
                "would run (forced)" if p.action == "force" else "would run")
            info = ""
        echo(f"  {p.name:<14} {status:<28} {p.key:<17} {info}")
