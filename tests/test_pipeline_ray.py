"""Real Ray Train runs (slow: ~35 s fixed cost per 2-worker fit on 2 cores): DDP on gloo with Ray Data shards,
and a worker killed mid-training that is restarted and resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from biflow.cli import main
from biflow.pipeline.spec import ScalingSection, load_pipeline
from test_pipeline import DIGITS, STEPS, TINY, runs_of, sets, table

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


def test_a_pipeline_trains_stage_2_on_a_two_worker_torchtrainer(tmp_path, capsys):
    """Stage 2 on 2 DDP workers (stage 1 in-process; the killed-worker test below runs stage 1 on 2 workers)."""
    code = main(["run", str(DIGITS), *sets(tmp_path, "train_reverse.num_workers=2")])
    out = capsys.readouterr().out
    assert code == 0 and table(out) == {s: "ran" for s in STEPS}
    record = json.loads((next((tmp_path / "train_reverse").iterdir()) / "_done.json").read_text())
    assert record["result"]["training"]["workers"] == 2 and record["result"]["training"]["steps"] == 12
    c, runs = runs_of(tmp_path)
    rev = next(r for r in runs if r.info.run_name == "train_reverse")
    assert [m.step for m in c.get_metric_history(rev.info.run_id, "train/loss")] == [4, 8, 12]  # logged by rank 0
    assert "train/align" in rev.data.metrics


def registered_checkpoint_step(run_dir) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered (it polls workers every 2 s)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def test_a_killed_worker_is_restarted_and_training_resumes_from_the_last_checkpoint(tmp_path):
    import ray
    from ray.util.state import list_actors

    from biflow.checkpoint import read_checkpoint
    from biflow.data import prepare, read_manifest
    from biflow.pipeline.raytrain import StageJob, train_on_ray

    cfg = load_pipeline(DIGITS, [*TINY, "train_forward.steps=300", "train_forward.ckpt_every=20",
                                 "train_forward.log_every=20"])
    data = prepare(cfg.data, tmp_path / "data")
    manifest = read_manifest(data / "train")
    job = StageJob("forward", cfg.model_dump(exclude={"pipeline"}), str(data), str(data / "train"), manifest["meta"],
                   manifest["content_hash"], str(tmp_path / "work"))
    storage = tmp_path / "ray"
    killed: list[int] = []

    def kill_a_worker_after_a_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and registered_checkpoint_step(storage / "kill-test") is None:
            time.sleep(0.05)
        workers = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if workers:
            pid = sorted(w.pid for w in workers)[-1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True)
    killer.start()
    summary = train_on_ray(job, 2, ScalingSection(max_failures=2), str(storage), "kill-test", tmp_path / "forward.pt")
    killer.join(timeout=10)
    assert killed, "no worker was killed"
    assert summary["steps"] == 300
    assert 0 < summary["resumed_from_step"] < 300, summary  # the restarted group continued from a checkpoint
    assert read_checkpoint(tmp_path / "forward.pt")["step"] == 300
