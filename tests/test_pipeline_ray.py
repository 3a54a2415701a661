"""A real Ray Train run inside a pipeline (slow: ~35 s fixed cost per 2-worker fit on 2 cores): DDP on gloo with
Ray Data shards, and a worker killed mid-training that is restarted and resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from biflow.cli import main
from test_pipeline import DIGITS, STEPS, runs_of, sets, table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray instance with its dashboard: Ray Train cleans up through it, and the state API finds workers."""
    import ray

    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the pipelines' own default store, under tmp storage
    if ray.is_initialized():  # left over by another module: start ours with the settings below
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                                       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield
    ray.shutdown()
    if saved_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def registered_checkpoint_step(run_dir) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered (it polls workers every 2 s)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kill_a_worker_after_a_checkpoint(run_dirs, killed: list[tuple[int, int]], timeout: float = 300) -> None:
    """SIGKILL one Ray Train worker once a run directory matching `run_dirs()` has a registered checkpoint;
    appends (pid, step of the latest registered checkpoint just before the kill) to `killed`."""
    import ray
    from ray.util.state import list_actors

    def latest() -> int:
        return max((registered_checkpoint_step(d) or 0 for d in run_dirs()), default=0)

    deadline = time.time() + timeout
    while not (step := latest()) and time.time() < deadline:
        time.sleep(0.05)
    workers = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    if workers:
        pid = sorted(w.pid for w in workers)[-1]
        os.kill(pid, signal.SIGKILL)
        killed.append((pid, step))


def test_stage_2_on_a_two_worker_torchtrainer_survives_a_killed_worker_and_resumes(tmp_path, capsys):
    """Stage 2 of a pipeline on 2 DDP workers (stage 1 in-process; test_cluster runs stage 1 on workers of two
    nodes and kills a node); one worker is killed after the first registered checkpoint: the group restarts
    from it and the step finishes all its steps, with rank 0's curves in MLflow."""
    steps = ["train_reverse.num_workers=2", "train_reverse.steps=200", "train_reverse.ckpt_every=20",
             "train_reverse.log_every=20"]
    killed: list[tuple[int, int]] = []
    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True,
                              args=(lambda: (tmp_path / "_work" / "train_reverse").glob("*/train_reverse-*"), killed))
    killer.start()
    code = main(["run", str(DIGITS), *sets(tmp_path, *steps)])
    killer.join(timeout=10)
    out = capsys.readouterr().out
    assert killed, "no worker was killed"
    assert code == 0 and table(out) == {s: "ran" for s in STEPS}
    training = json.loads((next((tmp_path / "train_reverse").iterdir()) / "_done.json").read_text())["result"]["training"]
    assert training["workers"] == 2 and training["steps"] == 200
    # the restarted group continued from the checkpoint registered before the kill (or a later one)
    [(_, checkpoint_at_kill)] = killed
    assert 0 < checkpoint_at_kill <= training["resumed_from_step"] < 200, (checkpoint_at_kill, training)
    assert training["resumed_from_step"] % 20 == 0, training  # a checkpoint step (ckpt_every=20)
    c, runs = runs_of(tmp_path)
    rev = next(r for r in runs if r.info.run_name == "train_reverse")
    logged = [m.step for m in c.get_metric_history(rev.info.run_id, "train/loss")]  # by rank 0, again after the restart
    assert logged[-1] == 200 and all(step % 20 == 0 for step in logged)
    assert "train/align" in rev.data.metrics
