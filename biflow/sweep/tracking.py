"""MLflow for sweeps: one parent run per sweep, one child run per trial, written from the Tune driver.

`TrialRuns` is a Ray Tune callback, so every MLflow write happens in the driver process (one
sqlite writer, no per-actor setup). Child runs carry the trial's whole flat config as params, the
reported curves (val_fd, val_recon, loss, train/*) against the training step, the final scores, and tags:

    biflow.kind           trial | reference (the exact inverse) | the pipeline's own step runs
    biflow.trial_id       Tune's trial id (a resumed sweep finds the run again by it)
    biflow.trial.status   running | finished | stopped_early | failed | interrupted
    biflow.trial.invocation  which invocation of the sweep (1, then 2 after a --resume, ...) ran it last

A trial the scheduler stops early is ended KILLED with status `stopped_early` (never left RUNNING);
trials still running when the sweep is interrupted are ended KILLED `interrupted` by the runner and
reopened when `--resume` restarts them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from biflow.config import flatten
from biflow.pipeline.tracking import RunRef, StepRun, _client
from biflow.sweep.space import Space
from biflow.sweep.trial import FINAL

STATUS = "biflow.trial.status"
KIND = "biflow.kind"
VALIDATION = ("val_fd", "val_recon", "loss")  # the curves the scheduler can judge
LOGGED_FINAL = ("class_acc", "nfe", "ms_per_image_in_trial", "steps_trained", "upstream_s", "train_s", "eval_s",
                "num_eval_samples")


def trial_params(space: Space, base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The params of a trial's child run: its whole flat config, the evaluation settings, and its axis values."""
    cfg = space.trial_config(base, values)
    params = flatten(cfg.model_dump(exclude={"pipeline"}))
    params.update({f"evaluate.{k}": v for k, v in cfg.pipeline.evaluate.model_dump().items()})
    params.update({f"sweep.{k}": v for k, v in values.items()})
    return params


def trial_number(trial_id: str) -> int:
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def find_child(parent: RunRef, tags: dict[str, str]) -> str | None:
    """The run id of the parent's child run with these tags (None when there is none)."""
    filters = [f"tags.mlflow.parentRunId = '{parent.run_id}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = _client(parent.uri).search_runs([parent.experiment_id], " and ".join(filters), max_results=5)
    return runs[0].info.run_id if runs else None


def children(parent: RunRef, kind: str | None = None) -> list:
    """All child runs of the parent (optionally of one biflow.kind)."""
    flt = f"tags.mlflow.parentRunId = '{parent.run_id}'" + (f" and tags.`{KIND}` = '{kind}'" if kind else "")
    return _client(parent.uri).search_runs([parent.experiment_id], flt, max_results=10000)


def start_run(parent: RunRef, name: str, tags: dict[str, Any]) -> StepRun:
    """A child run of the sweep's parent with a display name of our choosing."""
    tags = {"mlflow.parentRunId": parent.run_id, **tags}
    run = _client(parent.uri).create_run(parent.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
    return StepRun(RunRef(parent.uri, parent.experiment_id, run.info.run_id))


def _error_text(trial) -> str:
    """The last lines of a failed trial's error file (the root cause is at the end)."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-6:])[-4000:] or "see the Tune trial directory"


class TrialRuns(Callback):
    """One MLflow child run per Tune trial (created at start, curves per result, ended on completion)."""

    def __init__(self, parent: RunRef, space: Space, base: dict[str, Any], state_file: str, metric: str,
                 listener: Callable[[str, Any], None] | None = None):
        self.parent, self.space, self.base, self.state_file, self.metric = parent, space, base, state_file, metric
        self.listener = listener  # called as listener(event, trial) after each event: "start", "complete", "error"
        self._runs: dict[str, StepRun] = {}
        self.invocation = 1

    def __getstate__(self):  # pickled into the Tuner's state: no clients, no open runs, no listener
        state = self.__dict__.copy()
        state["_runs"], state["listener"] = {}, None
        return state

    def setup(self, **info) -> None:
        self._runs = {}
        try:  # a resumed sweep: the runner bumped the invocation in the sweep's state file
            self.invocation = int(json.loads(Path(self.state_file).read_text()).get("invocation", 1))
        except (OSError, ValueError):
            self.invocation = 1

    def _notify(self, event: str, trial) -> None:
        if self.listener is not None:
            self.listener(event, trial)

    def _run(self, trial) -> StepRun:
        run = self._runs.get(trial.trial_id)
        if run is None:  # a result of a trial started before this driver (cannot happen normally): attach
            run_id = find_child(self.parent, {"biflow.trial_id": trial.trial_id})
            run = self._runs[trial.trial_id] = StepRun(RunRef(self.parent.uri, self.parent.experiment_id, run_id)) \
                if run_id else self._create(trial)
        return run

    def _create(self, trial) -> StepRun:
        values = trial.config.get("params", {})
        label = self.space.label(values)
        run = start_run(self.parent, f"trial {trial_number(trial.trial_id):03d}: {label}"[:250], {
            KIND: "trial", "biflow.trial_id": trial.trial_id, "biflow.trial.label": label})
        run.log_params(trial_params(self.space, self.base, values))
        return run

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        run_id = find_child(self.parent, {"biflow.trial_id": trial.trial_id})
        if run_id is not None:  # restarted by --resume: reopen its run
            run = StepRun(RunRef(self.parent.uri, self.parent.experiment_id, run_id))
            run.client.update_run(run_id, status="RUNNING")
        else:
            run = self._create(trial)
        self._runs[trial.trial_id] = run
        run.set_tags({STATUS: "running", "biflow.trial.invocation": self.invocation})
        self._notify("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run = self._run(trial)
        if "step" in result and not result.get(FINAL):
            step = int(result["step"])
            run.log_metrics({k: v for k, v in result.items() if k in VALIDATION or k.startswith("train/")}, step)
        if result.get(FINAL):
            step = int(result.get("steps_trained", 0))
            metric = result.get("metric_name", self.metric)
            run.log_metrics({metric: result.get(metric), **{k: result.get(k) for k in LOGGED_FINAL}}, step)
            run.set_tags({"biflow.forward_key": result.get("forward_key", "-")})
            samples = result.get("samples")
            if samples and Path(samples).is_file():
                run.log_artifact(samples, "samples")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        finished = bool((trial.last_result or {}).get(FINAL))
        run.set_tags({STATUS: "finished" if finished else "stopped_early"})
        if not finished:
            run.set_tags({"mlflow.note.content": f"Stopped early by the {self.space.spec.scheduler.type} scheduler "
                                                 f"at step {(trial.last_result or {}).get('step', '?')}."})
        run.end("FINISHED" if finished else "KILLED")
        self._runs.pop(trial.trial_id, None)
        last = trial.last_result or {}
        label = self.space.label(trial.config.get("params", {}))
        if finished:
            metric = last.get("metric_name", self.metric)
            print(f"  trial {trial_number(trial.trial_id):03d} ({label}): {metric} {last.get(metric, float('nan')):.4g} "
                  f"after {last.get('steps_trained', '?')} steps", flush=True)
        else:
            print(f"  trial {trial_number(trial.trial_id):03d} ({label}): stopped early at step {last.get('step', '?')}", flush=True)
        self._notify("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run = self._run(trial)
        msg = _error_text(trial)
        run.set_tags({STATUS: "failed", "biflow.error": msg[-4000:]})
        run.end("FAILED")
        print(f"  trial {trial_number(trial.trial_id):03d} failed: {msg.splitlines()[-1] if msg else '?'}", flush=True)
        self._runs.pop(trial.trial_id, None)
        self._notify("error", trial)
