"""A real two-node Ray cluster and a real MLflow server on this machine (loopback only), driven like a user would.

The cluster (tests/support/local_cluster.py, LocalCluster): a head and a second node, each its own `ray start`
process group with one CPU, distinct loopback IPs and ports, token authentication on; an MLflow
server with a sqlite database and proxied artifacts. One tiny digits pipeline is submitted with
`biflow submit` (stage 1 on a 2-worker TorchTrainer, so training spans both nodes), and the second
node's raylet is SIGKILLed once Ray Train has registered a checkpoint; a replacement node joins (as
an autoscaler would bring one). The job must still succeed, stage 1 resuming from that checkpoint,
every run and artifact must be on the tracking server, and no cache entry may ever be half-written.
Everything is torn down by process id at the end, also on failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.local_cluster import LocalCluster, ray_start_works

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DIGITS = "pipelines/digits.yaml"
STEPS = ["prepare", "train_forward", "train_reverse", "evaluate", "report"]
EXPERIMENT = "biflow-cluster"
TINY = [
    "forward.size=tiny", "reverse.size=tiny", "train_forward.batch_size=32", "train_reverse.batch_size=32",
    "train_forward.num_workers=2",                     # stage 1 on Ray Train: one worker per node
    "train_forward.steps=300", "train_forward.ckpt_every=20", "train_forward.log_every=20",
    "train_reverse.steps=12", "train_reverse.log_every=4", "train_reverse.ckpt_every=6",
    "pipeline.evaluate.num_samples=24", "pipeline.evaluate.batch_size=24", "pipeline.evaluate.timing_batch=8",
    "pipeline.evaluate.timing_repeats=1", "pipeline.evaluate.grid=16",
    "pipeline.train_forward.cpus=1", "pipeline.train_reverse.cpus=1",
    f"pipeline.experiment={EXPERIMENT}", "pipeline.register_model=biflow-cluster-reverse",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def client_env(home: Path, token: str | None) -> dict[str, str]:
    """The submitting user's shell: no Ray/MLflow settings of this machine, HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k not in ("BIFLOW_SHARED_STORAGE", "BIFLOW_STORAGE")}
    env["HOME"] = str(home)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture
def user(monkeypatch, capsys, home):
    """`biflow ARGS` run in this process by a user whose shell holds `token` (or none) and nothing else of Ray's."""

    def run(*args: str, token: str | None) -> subprocess.CompletedProcess:
        from biflow.cli import main

        for key in list(os.environ):
            if key.startswith(("RAY_", "MLFLOW_")) or key in ("BIFLOW_SHARED_STORAGE", "BIFLOW_STORAGE"):
                monkeypatch.delenv(key)
        monkeypatch.setenv("HOME", str(home))
        if token:
            monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        monkeypatch.chdir(ROOT)
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biflow submit: error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ray_start_works()
    if why:
        pytest.skip(f"`ray start` cannot run on this machine: {why}")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    c.start([{"cpus": 1, "resources": {"node2": 1}}])  # stops what it started if it fails
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@dataclass
class KillRun:
    """The submitted pipeline that lost a node mid-training."""

    proc: subprocess.CompletedProcess
    storage: Path
    killed_node_id: str
    killed_at: float
    replacement: object
    checkpoint_at_kill: int  # step of the latest checkpoint Ray Train had registered when the raylet was killed
    cache_violations: list[str] = field(default_factory=list)
    records_seen: dict[str, float] = field(default_factory=dict)  # step -> first time its record was seen


def _train_run_dir(storage: Path) -> Path | None:
    """Ray Train's run directory of stage 1 (under the storage root's _work/)."""
    return next(iter(sorted((storage / "_work" / "train_forward").glob("*/train_forward-*"))), None)


def _registered_checkpoint(storage: Path) -> int | None:
    """Step of the latest checkpoint Ray Train's controller has registered (so a restart resumes from it)."""
    run_dir = _train_run_dir(storage)
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _watch_cache(storage: Path, stop: threading.Event, violations: list[str], seen: dict[str, float]) -> None:
    """While the job runs: every done record visible must describe complete outputs (never a half-written entry)."""
    from biflow.pipeline.cache import RECORD, Storage

    store = Storage(str(storage))
    while not stop.is_set():
        for record in storage.glob(f"*/*/{RECORD}"):
            step, key = record.parent.parent.name, record.parent.name
            if step.startswith("_"):
                continue
            if store.read_record(step, key) is None and record.exists():
                violations.append(f"{step}/{key}: a record whose outputs are incomplete or unreadable")
            seen.setdefault(step, time.time())
        stop.wait(0.3)


@pytest.fixture(scope="module")
def kill_run(cluster, home, tmp_path_factory) -> KillRun:
    from mlflow import MlflowClient

    # An experiment created by the server itself: its artifact root is mlflow-artifacts:/, so every artifact
    # the job logs travels to the server over HTTP (no worker writes to a path the server merely points to).
    MlflowClient(cluster.tracking_uri).create_experiment(EXPERIMENT)
    storage = tmp_path_factory.mktemp("storage")
    log = storage.parent / "submit.log"
    cmd = [str(BIN / "biflow"), "submit", "--address", cluster.dashboard, "--storage", str(storage),
           "--shared-storage",  # one machine: the tmp dir is shared by both nodes (the opt-out of the check)
           "--tracking-uri", cluster.tracking_uri,
           "--env", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=900",  # wait for the replacement node, however slow
           "--", "run", DIGITS, *sets(*TINY)]
    stop, violations, seen = threading.Event(), [], {}
    watcher = threading.Thread(target=_watch_cache, args=(storage, stop, violations, seen), daemon=True)
    watcher.start()
    worker = cluster.nodes[1]
    node_ids = {n["node_ip"]: n["node_id"] for n in cluster.api().nodes()}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=client_env(home, cluster.token), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 900
            while (checkpoint_at_kill := _registered_checkpoint(storage)) is None:
                assert proc.poll() is None, f"the job ended before a checkpoint was registered:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"no Ray Train checkpoint after 900 s:\n{log.read_text()[-4000:]}"
                time.sleep(0.1)
            assert "train_forward" not in seen, "stage 1 finished before the node could be killed"
            cluster.kill_raylet(worker)
            killed_at = time.time()
            replacement = cluster.add_worker(1, {"node2": 1}, wait=False)
            proc.wait(timeout=1500)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop.set()
            watcher.join(timeout=10)
    done = subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")
    return KillRun(done, storage, node_ids[worker.ip], killed_at, replacement, checkpoint_at_kill, violations, seen)


# ------------------------------------------------------------ quick refusals
def test_without_a_token_the_cluster_refuses_in_one_line(cluster, user):
    line = one_line_error(user("submit", "--address", cluster.dashboard, "--list", token=None))
    assert "requires an auth token" in line and "RAY_AUTH_TOKEN" in line
    line = one_line_error(user("submit", "--address", cluster.dashboard, "--list", token="not-the-token"))
    assert "rejected the auth token" in line and "$RAY_AUTH_TOKEN" in line


def test_node_local_storage_is_refused_before_anything_is_uploaded(cluster, user, tmp_path):
    before = user("submit", "--address", cluster.dashboard, "--list", token=cluster.token)
    proc = user("submit", "--address", cluster.dashboard, "--storage", str(tmp_path / "storage"),
                "--", "run", DIGITS, *sets(*TINY), token=cluster.token)
    line = one_line_error(proc)
    assert "node-local path" in line and "2 nodes" in line and "BIFLOW_SHARED_STORAGE=1" in line
    assert "submitted" not in proc.stdout
    assert user("submit", "--address", cluster.dashboard, "--list", token=cluster.token).stdout == before.stdout


def test_a_relative_storage_root_is_refused(cluster, user):
    line = one_line_error(user("submit", "--address", cluster.dashboard, "--", "run", DIGITS, token=cluster.token))
    assert "pipeline.storage runs/pipeline is relative" in line and "--storage" in line


# ------------------------------------------------------------- the pipeline run
def test_the_submitted_job_succeeds_although_a_node_died_mid_training(kill_run):
    out = kill_run.proc.stdout
    assert kill_run.proc.returncode == 0, out[-6000:]
    assert re.search(r"job raysubmit_\w+ submitted", out) and re.search(r"job raysubmit_\w+ SUCCEEDED", out)
    assert "storage " in out and "(2 nodes)" in out  # the preflight saw the two-node cluster
    for step in STEPS:
        assert re.search(rf"^  {step}\s+ran\b", out, re.M), f"{step} did not run:\n{out[-4000:]}"


def store_record(kill_run: KillRun, step: str) -> dict:
    """The done record of the run's only cache entry of `step`."""
    from biflow.pipeline.cache import Storage

    key = next((kill_run.storage / step).iterdir()).name
    return Storage(str(kill_run.storage)).read_record(step, key)


def test_training_resumed_from_the_registered_checkpoint(kill_run):
    training = store_record(kill_run, "train_forward")["result"]["training"]
    assert training["workers"] == 2 and training["steps"] == 300
    # continued from the checkpoint registered before the kill (or a later one), not from scratch
    assert kill_run.checkpoint_at_kill <= training["resumed_from_step"] < 300, (kill_run.checkpoint_at_kill, training)
    assert training["resumed_from_step"] % 20 == 0, training  # a checkpoint step (train_forward.ckpt_every=20)
    assert kill_run.records_seen["train_forward"] > kill_run.killed_at  # no record from the attempt that lost a node


def test_steps_and_training_workers_ran_on_more_than_one_node(cluster, kill_run):
    api = cluster.api()
    nodes = {n["node_id"]: n for n in api.nodes(alive_only=False)}
    ip = {node_id: n["node_ip"] for node_id, n in nodes.items()}
    assert nodes[kill_run.killed_node_id]["state"] == "DEAD"
    # Stage 1's two ranks: head + second node, then (after the kill) head + the replacement node.
    workers = {t["node_id"] for t in api.tasks([("name", "=", "RayTrainWorker.run_train_fn")])}
    assert {ip[n] for n in workers} == {cluster.nodes[0].ip, cluster.nodes[1].ip, kill_run.replacement.ip}
    steps = {t["name"]: t["node_id"] for t in api.tasks() if t["name"].startswith("biflow:")}
    assert set(steps) == {f"biflow:{s}" for s in STEPS}
    samplers = {t["node_id"] for t in api.tasks([("name", "=", "score_sampler")])}
    assert len(set(steps.values()) | workers | samplers) >= 3


def test_every_run_and_artifact_reached_the_tracking_server(cluster, kill_run):
    from mlflow import MlflowClient

    client = MlflowClient(cluster.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    attempts = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    children = {r.info.run_name: r for r in attempts if r.info.status == "FINISHED"}
    assert sorted(children) == sorted(STEPS) and len(children) == len([r for r in attempts if r.info.status == "FINISHED"])
    assert all(r.info.status in ("FINISHED", "KILLED") for r in attempts)  # KILLED: an attempt Ray ran again

    def files(run) -> set[str]:
        out, todo = set(), [None]
        while todo:
            for a in client.list_artifacts(run.info.run_id, todo.pop()):
                (todo.append(a.path) if a.is_dir else out.add(a.path))
        return out

    expected = {"train_forward": {"checkpoints/forward.pt"}, "train_reverse": {"checkpoints/reverse.pt"},
                "evaluate": {"samples/samples_1nfe.png", "samples/samples_exact.png"},
                "report": {"report.md", "report.json", "fid_vs_speed.png"}}
    for step, names in expected.items():
        run = children[step]
        assert names <= files(run), (step, files(run))
        for name in names:  # on the server's own artifact store, put there by the server
            stored = cluster.artifacts_dir / exp.experiment_id / run.info.run_id / "artifacts" / name
            assert stored.is_file() and stored.stat().st_size > 0, stored
    assert {"report.md", "report.json"} <= files(parents[0])
    fwd = children["train_forward"]
    resumed = store_record(kill_run, "train_forward")["result"]["training"]["resumed_from_step"]
    assert fwd.data.metrics["train/resumed_from_step"] == resumed > 0  # rank 0 logged its restart to the server
    assert [m.step for m in client.get_metric_history(fwd.info.run_id, "train/loss")][-1] == 300
    versions = client.search_model_versions("name='biflow-cluster-reverse'")
    assert [v.run_id for v in versions] == [children["train_reverse"].info.run_id]


def test_the_cache_was_never_half_written(kill_run):
    from biflow.pipeline.runner import plan, storage_for
    from biflow.pipeline.spec import load_pipeline

    assert kill_run.cache_violations == []
    cfg = load_pipeline(ROOT / DIGITS, [*TINY, f"pipeline.storage={kill_run.storage}"])
    assert [(p.name, p.action) for p in plan(cfg, storage_for(cfg))] == [(s, "cached") for s in STEPS]
    assert not any((kill_run.storage / "_work").glob("*/*")), "a finished step keeps no resumable state"
    leftovers = [p for p in kill_run.storage.rglob("*") if p.name.endswith(".tmp") or ".download-" in p.name]
    assert leftovers == []


def test_plain_ray_job_submit_runs_the_same_command(cluster, kill_run, home):
    """`ray job submit -- biflow run ...` (Ray's own CLI, token from the environment): everything comes from the cache."""
    env = client_env(home, cluster.token)
    env["RAY_AUTH_MODE"] = "token"  # Ray's CLI sends RAY_AUTH_TOKEN only in token mode
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"env_vars": {"BIFLOW_SHARED_STORAGE": "1",
                                                          "MLFLOW_TRACKING_URI": cluster.tracking_uri}}),
           "--", "biflow", "run", DIGITS, *sets(*TINY, f"pipeline.storage={kill_run.storage}")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "0 step(s) ran" in out and "succeeded" in out.lower()
    for step in STEPS:
        assert re.search(rf"^  {step}\s+cached\b", out, re.M), out[-3000:]


def test_status_list_and_stop_of_a_running_job(cluster, user, tmp_path):
    proc = user("submit", "--address", cluster.dashboard, "--no-wait", "--shared-storage", "--storage", str(tmp_path),
                "--", "run", DIGITS, *sets(*TINY, "train_forward.steps=100000"), token=cluster.token)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"job (raysubmit_\w+) submitted", proc.stdout).group(1)
    assert f"--follow {job}" in proc.stdout and f"--stop {job}" in proc.stdout
    listed = user("submit", "--address", cluster.dashboard, "--list", token=cluster.token)
    assert listed.returncode == 0 and job in listed.stdout
    stopped = user("submit", "--address", cluster.dashboard, "--stop", job, token=cluster.token)
    assert stopped.returncode == 0 and f"job {job} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    status = user("submit", "--address", cluster.dashboard, "--status", job, token=cluster.token)
    assert status.returncode == 1 and re.search(r"^status\s+STOPPED$", status.stdout, re.M), status.stdout
    from biflow.pipeline.cache import Storage

    store = Storage(str(tmp_path))  # whatever finished before the stop is complete; the stopped step left no record
    records = [(r.parent.parent.name, r.parent.name) for r in tmp_path.glob("*/*/_done.json")]
    assert all(store.read_record(step, key) is not None for step, key in records)
    assert "train_forward" not in {step for step, _ in records}
    unknown = user("submit", "--address", cluster.dashboard, "--status", "raysubmit_nosuchjob", token=cluster.token)
    assert "no job raysubmit_nosuchjob" in one_line_error(unknown)
