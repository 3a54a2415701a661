"""`biflow sweep` end to end on tiny digits models: ASHA, the shared stage 1, MLflow records, resume.

One local Ray instance and one storage root serve the module: the first sweep trains stage 1, the
resumed sweep finds it in the cache. Trials train in-process (num_workers 0), 24 stage-2 steps each.
"""
from __future__ import annotations

import json
import math
import os
import signal
import textwrap
from pathlib import Path

import pytest

from biflow.cli import main
from biflow.pipeline.spec import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"
TINY = [
    "forward.size=tiny", "reverse.size=tiny", "train_forward.steps=12", "train_forward.batch_size=32",
    "train_forward.log_every=6", "train_reverse.batch_size=32", "train_reverse.warmup_steps=4",
    "pipeline.train_forward.cpus=1", "pipeline.train_reverse.cpus=1",
]
EVAL = "evaluate: {num_samples: 40, batch_size: 40, timing_batch: 8, timing_repeats: 1, grid: 16}"
# 4 trials; lr 1e-7 barely trains, so ASHA (rungs at 8 and 16 steps, keep the better half) stops some of them.
ASHA = f"""
    description: tiny ASHA sweep for the tests
    metric: fd_evaluator
    max_concurrent: 2
    steps: 24
    report_every: 4
    val_images: 64
    scheduler: {{type: asha, grace_period: 8, reduction_factor: 2}}
    {EVAL}
    params:
      train_reverse.lr: {{grid: [0.003, 1.0e-7]}}
      reverse_loss.normalize: {{grid: [true, false]}}
    """
FIFO = f"""
    metric: fd_evaluator
    max_concurrent: 2
    steps: 12
    report_every: 6
    val_images: 64
    scheduler: {{type: fifo}}
    {EVAL}
    params:
      reverse_loss.align: {{grid: [0.5, 1.0, 2.0, 4.0]}}
    """


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ray.init(num_cpus=2, resources={"train_driver": 2}, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep_store")


def overrides(storage: Path) -> list[str]:
    return [*TINY, f"pipeline.storage={storage}"]


def space_file(storage: Path, name: str, text: str) -> Path:
    path = storage.parent / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def mlflow(storage: Path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    return c, c.get_experiment_by_name("biflow-digits").experiment_id


def sweep_runs(storage: Path, space: str):
    """(client, parent run, {trial id: child run}, all runs of the store) of the latest sweep of `space`."""
    c, exp = mlflow(storage)
    every = c.search_runs([exp], max_results=1000)
    parent = next(r for r in every if r.data.tags.get("biflow.kind") == "sweep" and r.data.tags["biflow.sweep"].startswith(space))
    trials = {r.data.tags["biflow.trial_id"]: r for r in every
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.data.tags.get("biflow.kind") == "trial"}
    return c, parent, trials, every


@pytest.fixture(scope="module")
def asha_sweep(storage):
    space = space_file(storage, "asha", ASHA)
    argv = ["sweep", str(space), "--pipeline", str(DIGITS)]
    for item in overrides(storage):
        argv += ["--set", item]
    assert main(argv) == 0
    return storage


# ------------------------------------------------------------------- the sweep
def test_a_tiny_asha_sweep_trains_stage_one_once_and_shares_it(asha_sweep):
    storage = asha_sweep
    done = [p for p in (storage / "train_forward").iterdir() if (p / "_done.json").is_file()]
    assert len(done) == 1  # one cached forward flow for all four trials
    key = done[0].name
    c, parent, trials, every = sweep_runs(storage, "asha")
    stage1 = [r for r in every if r.data.tags.get("biflow.step") == "train_forward"]
    assert len(stage1) == 1 and stage1[0].data.tags["biflow.cache"] == "miss"
    assert stage1[0].data.tags["mlflow.parentRunId"] == parent.info.run_id  # it ran for this sweep
    assert key in parent.data.tags["biflow.upstream.train_forward"]
    scored = [r for r in trials.values() if r.data.tags["biflow.trial.status"] == "finished"]
    assert scored and all(r.data.tags["biflow.forward_key"] == key for r in scored)


def test_the_store_holds_the_parent_four_trials_the_figure_and_the_table(asha_sweep):
    storage = asha_sweep
    c, parent, trials, every = sweep_runs(storage, "asha")
    assert parent.info.status == "FINISHED"
    assert len(trials) == 4
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]  # nothing left RUNNING
    status = {tid: (r.info.status, r.data.tags["biflow.trial.status"]) for tid, r in trials.items()}
    assert set(status.values()) <= {("FINISHED", "finished"), ("KILLED", "stopped_early")}
    stopped = [tid for tid, s in status.items() if s[1] == "stopped_early"]
    finished = [tid for tid, s in status.items() if s[1] == "finished"]
    assert stopped and finished, status
    for tid in stopped:  # stopped before the last step, with the curve the scheduler judged it on
        steps = [m.step for m in c.get_metric_history(trials[tid].info.run_id, "val_fd")]
        assert steps and max(steps) < 24
    for tid in finished:
        run = trials[tid]
        assert {"fd_evaluator", "ms_per_image", "nfe", "class_acc", "val_fd", "val_recon"} <= set(run.data.metrics)
        for curve in ("val_fd", "val_recon", "loss"):  # reported every 4 steps, what ASHA judged (val_fd)
            assert [m.step for m in c.get_metric_history(run.info.run_id, curve)] == [4, 8, 12, 16, 20, 24], curve
        assert run.data.params["reverse_loss.normalize"] in ("True", "False") and "train_reverse.lr" in run.data.params
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"pareto.png", "trials.csv", "best_pipeline.yaml", "summary.json"} <= artifacts
    table = Path(c.download_artifacts(parent.info.run_id, "trials.csv")).read_text().splitlines()
    assert table[0].startswith("trial_id,status,label,train_reverse.lr,reverse_loss.normalize,fd_evaluator,ms_per_image")
    # how well ASHA's judge (the last val_fd) ranked the finished trials like the final metric: Spearman's rho,
    # logged when at least 3 trials finished and rho is defined, absent otherwise
    from scipy.stats import spearmanr

    pairs = [(trials[tid].data.metrics["val_fd"], trials[tid].data.metrics["fd_evaluator"]) for tid in finished]
    rho = spearmanr(*zip(*pairs)).statistic if len(pairs) >= 3 else float("nan")
    if math.isfinite(rho):
        assert parent.data.metrics["scheduler_metric_spearman"] == pytest.approx(rho), pairs
    else:
        assert "scheduler_metric_spearman" not in parent.data.metrics, pairs
    assert len(table) == 1 + 4 + 1  # header, the trials, the exact-inverse reference
    reference = [r for r in every if r.data.tags.get("biflow.kind") == "reference"
                 and r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(reference) == 1 and reference[0].data.metrics["nfe"] > 1


def test_the_best_trial_is_written_back_as_a_runnable_pipeline(asha_sweep):
    c, parent, trials, _ = sweep_runs(asha_sweep, "asha")
    best = trials[parent.data.tags["biflow.best_trial"]]
    path = Path(c.download_artifacts(parent.info.run_id, "best_pipeline.yaml"))
    cfg = load_pipeline(path)
    assert cfg.train_reverse.lr == float(best.data.params["train_reverse.lr"])
    assert cfg.train_reverse.steps == 24 and cfg.forward.size == "tiny"
    assert best.data.metrics["fd_evaluator"] == min(r.data.metrics["fd_evaluator"] for r in trials.values()
                                                    if "fd_evaluator" in r.data.metrics)


# ---------------------------------------------------------------------- resume
def test_an_interrupted_sweep_resumes_and_runs_only_the_missing_trials(asha_sweep, capsys):
    from biflow.sweep.runner import run_sweep

    storage = asha_sweep
    space = space_file(storage, "fifo", FIFO)
    completed: list[str] = []

    def interrupt_after_two(event, trial):  # what Ctrl-C does to a running sweep (Tune handles SIGUSR1 the same way)
        if event == "complete":
            completed.append(trial.trial_id)
            if len(completed) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    first = run_sweep(space, DIGITS, overrides(storage), listener=interrupt_after_two)
    assert first.interrupted and first.upstream == {"prepare": "cached", "train_forward": "cached"}
    c, parent, trials, every = sweep_runs(storage, "fifo")
    assert parent.info.status == "KILLED" and not [r for r in every if r.info.status == "RUNNING"]
    assert json.loads((first.run_dir / "sweep.json").read_text())["status"] == "interrupted"
    done_first = {tid for tid, r in trials.items() if r.data.tags["biflow.trial.status"] == "finished"}
    assert done_first and len(done_first) < 4
    history = {tid: len(c.get_metric_history(trials[tid].info.run_id, "val_recon")) for tid in done_first}

    argv = ["sweep", str(space), "--pipeline", str(DIGITS), "--resume"]
    for item in overrides(storage):
        argv += ["--set", item]
    assert main(argv) == 0
    c, parent2, trials, every = sweep_runs(storage, "fifo")
    assert parent2.info.run_id == parent.info.run_id and parent2.info.status == "FINISHED"
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials.values())
    for tid, run in trials.items():
        ran_in = run.data.tags["biflow.trial.invocation"]
        assert ran_in == ("1" if tid in done_first else "2"), (tid, ran_in)
    for tid in done_first:  # finished trials were not redone: their curves did not grow
        assert len(c.get_metric_history(trials[tid].info.run_id, "val_recon")) == history[tid]
    assert len([r for r in every if r.data.tags.get("biflow.step") == "train_forward"]) == 1  # still one stage 1


# ------------------------------------------------------------------ Ray Train
def test_with_workers_each_trial_drives_a_ray_train_run(asha_sweep):
    """train_reverse.num_workers > 0: the trial drives a 2-worker TorchTrainer (DDP on gloo) and still reports
    val_recon to Tune as it goes (~1 min of Ray Train start-up on 2 cores)."""
    from biflow.sweep.runner import run_sweep

    storage = asha_sweep
    space = space_file(storage, "ddp", f"""
        metric: fd_evaluator
        steps: 8
        report_every: 4
        val_images: 32
        scheduler: {{type: fifo}}
        {EVAL}
        params:
          reverse_loss.align: {{grid: [1.0]}}
        """)
    result = run_sweep(space, DIGITS, [*overrides(storage), "train_reverse.num_workers=2"])
    assert not result.interrupted and result.count("finished") == 1, result.rows
    assert result.upstream["train_forward"] == "cached"
    c, parent, trials, _ = sweep_runs(storage, "ddp")
    (run,) = trials.values()
    assert run.info.status == "FINISHED" and run.data.params["train_reverse.num_workers"] == "2"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_fd")] == [4, 8]
    assert "fd_evaluator" in run.data.metrics
    assert any((result.run_dir / "ray_train").iterdir())  # the trial's Ray Train run (stable name: resumable)
