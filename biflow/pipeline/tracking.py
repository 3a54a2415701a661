"""MLflow tracking: one parent run per `biflow run`, one child run per step, names that line up across runs.

Everything goes through `MlflowClient(tracking_uri)` with an absolute URI resolved in the driver
(Ray workers change directory; a relative sqlite URI would create a database per worker). A step's
child run is created by the process that executes the step and logs while it works; a cached step
gets a child run too, tagged `biflow.cache = hit` and pointing at the run that produced it.

Stable names (the compare view lines runs up on them):
    params   the flat config, `section.key` (parent: all; child: the step's own sections)
    metrics  train/<term> (loss, nll_noisy_bpd, state_rms/<i>, grad_norm, lr, images_per_s, perceptual/<net>, ...)
             per step, test/bits_per_dim (standard: uniformly dequantised 8-bit data), test/nll_noisy_bpd (the
             Gaussian-noised training data), <sampler>/<metric> (fd_evaluator or fid, is, class_acc, ms_per_image, nfe),
             speedup/exact_over_1nfe
    tags     biflow.step, biflow.key, biflow.cache (hit | miss), biflow.source_run_id, biflow.pipeline
"""
from __future__ import annotations

import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biflow.errors import UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines; nothing leaves the machine unasked
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server fails in seconds, not minutes

METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
PARAMS_PER_BATCH = 100


class TrackingError(UserError):
    """The tracking store cannot be reached or used, as one line."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when the tracking store cannot be used (MLflow itself retries for minutes)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"tracking URI {uri}: cannot create {path.parent} ({err.strerror})") from None
        if not os.access(path.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri}: {path.parent} is not writable")
        return
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as err:
            raise TrackingError(f"tracking server {uri} is unreachable ({err.strerror or err}); "
                                "start it or set pipeline.tracking_uri / MLFLOW_TRACKING_URI") from None
        return
    if parsed.scheme in ("databricks", "postgresql", "mysql", "mssql") or parsed.scheme.startswith(("postgresql+", "mysql+")):
        return  # MLflow reports its own errors for these
    raise TrackingError(f"tracking URI {uri!r}: unsupported scheme {parsed.scheme!r} "
                        "(use sqlite:////abs/path/mlflow.db or http://host:5000)")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _param_value(v: Any) -> str:
    return "None" if v is None else str(v)


@dataclass(frozen=True)
class RunRef:
    """A picklable handle on one MLflow run (sent to Ray tasks)."""

    uri: str
    experiment_id: str
    run_id: str


class StepRun:
    """The child run of one executing step: batched metrics, images, figures, artifacts, tags."""

    def __init__(self, ref: RunRef):
        self.ref = ref
        self.client = _client(ref.uri)
        self._pending: list = []

    @property
    def run_id(self) -> str:
        return self.ref.run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0, prefix: str = "", flush: bool = True) -> None:
        """Queue metrics (NaN/None dropped); one log_batch per flush (a sqlite write costs ~10 ms)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._pending += [Metric(prefix + k, float(v), ts, int(step)) for k, v in metrics.items()
                          if isinstance(v, (int, float)) and v == v]
        if flush:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:METRICS_PER_BATCH], self._pending[METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _param_value(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + PARAMS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def register_pytorch(self, model, name: str) -> str:
        """Log `model` with mlflow.pytorch into this run and register it as a new version of `name`.

        Pickle format with the biflow package as code (loads with mlflow.pytorch.load_model anywhere,
        offline); pt2 export needs a tensor-only signature, which G(z, y, w) -> (x, hidden) does not have.
        """
        import mlflow
        import mlflow.pytorch

        package = Path(__file__).resolve().parents[1]  # the biflow package (not `import biflow`: no code-set edge to models)
        mlflow.set_tracking_uri(self.ref.uri)
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: this docstring says why pickle
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(model.cpu().eval(), name="reverse_model", registered_model_name=name,
                                                serialization_format="pickle", code_paths=[str(package)],
                                                pip_requirements=["torch", "einops", "pydantic", "numpy"])
        finally:
            quiet.setLevel(level)
        version = info.registered_model_version
        return str(version) if version is not None else ""

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


class Tracker:
    """Driver side: the experiment, the parent run, and child runs for steps."""

    def __init__(self, uri: str, experiment: str, artifact_location: str):
        check_reachable(uri)
        self.uri = uri
        self.client = _client(uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                experiment, artifact_location=artifact_location)
        except Exception as err:
            if isinstance(err, UserError):
                raise
            exp = self.client.get_experiment_by_name(experiment)  # created by a concurrent run in between
            if exp is None:
                raise TrackingError(f"tracking store {uri}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
            self.experiment_id = exp.experiment_id

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> StepRun:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: _param_value(v) for k, v in tags.items()})
        parent = StepRun(RunRef(self.uri, self.experiment_id, run.info.run_id))
        parent.log_params(params)
        return parent

    def end_open_children(self, parent: StepRun, status: str = "KILLED") -> None:
        """Close the child runs still RUNNING under `parent` (their steps were interrupted or never finished)."""
        query = f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=100):
            self.client.set_terminated(run.info.run_id, status)

    def run_link(self, run_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"


def start_child(parent: RunRef, step: str, tags: dict[str, Any]) -> StepRun:
    """A child run of `parent` for one step (called where the step executes, or by the driver for a cache hit)."""
    tags = {"mlflow.parentRunId": parent.run_id, "biflow.step": step, **tags}
    run = _client(parent.uri).create_run(parent.experiment_id, run_name=step,
                                         tags={k: _param_value(v) for k, v in tags.items()})
    return StepRun(RunRef(parent.uri, parent.experiment_id, run.info.run_id))
