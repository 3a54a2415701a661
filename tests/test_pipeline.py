"""The pipeline platform, end to end on a tiny config: `biflow run` on Ray, the step cache, MLflow records.

One local Ray instance serves the module; training runs in-process inside the step tasks (num_workers 0).
The multi-worker TorchTrainer runs and the killed worker are in test_pipeline_ray.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from biflow.cli import main
from biflow.pipeline.cache import RECORD, Storage
from biflow.pipeline.runner import execute_step, plan, storage_for
from biflow.pipeline.spec import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"
STEPS = ["prepare", "train_forward", "train_reverse", "evaluate", "report"]
TINY = [
    "forward.size=tiny", "reverse.size=tiny",
    "train_forward.steps=12", "train_reverse.steps=12", "train_forward.batch_size=32", "train_reverse.batch_size=32",
    "train_forward.log_every=4", "train_reverse.log_every=4", "train_forward.ckpt_every=6", "train_reverse.ckpt_every=6",
    "pipeline.evaluate.num_samples=24", "pipeline.evaluate.batch_size=24", "pipeline.evaluate.timing_batch=8",
    "pipeline.evaluate.timing_repeats=1", "pipeline.evaluate.grid=16",
    "pipeline.train_forward.cpus=1", "pipeline.train_reverse.cpus=1",
]


def sets(storage: Path, *extra: str) -> list[str]:
    out = []
    for item in [*TINY, f"pipeline.storage={storage}", *extra]:
        out += ["--set", item]
    return out


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the module (conftest)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def table(out: str, steps: list[str] = STEPS) -> dict[str, str]:
    """The progress table of `biflow run`: step -> status."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in steps and line.startswith("  "):
            rows[parts[0]] = parts[1]
    return rows


def client(storage: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")


def runs_of(storage: Path):
    c = client(storage)
    exp = c.get_experiment_by_name("biflow-digits")
    return c, c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=500)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The tiny digits pipeline run once from scratch: (storage, stdout)."""
    storage = tmp_path_factory.mktemp("pipeline")
    code = main(["run", str(DIGITS), *sets(storage)])
    assert code == 0
    return storage


# ------------------------------------------------------------------ definitions
@pytest.mark.parametrize("name", ["digits", "patches", "imagenet64", "imagenet256_latent"])
def test_every_shipped_pipeline_validates(name):
    cfg = load_pipeline(ROOT / "pipelines" / f"{name}.yaml", ["data.source=/datasets/imagenet/train"])
    assert cfg.pipeline.experiment.startswith("biflow")
    if name.startswith("imagenet"):
        assert cfg.forward.size == "B" and cfg.reverse.size == "B" and cfg.pipeline.evaluate.features == "inception"


@pytest.mark.parametrize("name", ["imagenet64", "imagenet256_latent"])
def test_paper_scale_pipelines_require_the_data_path(name, capsys):
    code, _, err = run_cli(capsys, "status", str(ROOT / "pipelines" / f"{name}.yaml"))
    assert code == 2 and "data.source is required" in err and len(err.strip().splitlines()) == 1


def test_the_latent_pipeline_plans_a_latent_step_between_prepare_and_stage_1(tmp_path, capsys):
    path = str(ROOT / "pipelines" / "imagenet256_latent.yaml")
    overrides = ["--set", "data.source=/datasets/imagenet/train", "--set", f"pipeline.storage={tmp_path}"]
    code, out, _ = run_cli(capsys, "status", path, *overrides)
    assert code == 0 and "6 step(s) would run: prepare, latent, train_forward, train_reverse, evaluate, report" in out


def test_forcing_a_step_the_pipeline_lacks_is_a_one_line_error(tmp_path, capsys):
    msg = one_line_error(capsys, "run", str(DIGITS), *sets(tmp_path), "--force", "latent")
    assert "--force latent: not a step of this pipeline" in msg and "prepare, train_forward" in msg


def test_keys_change_only_downstream_of_a_changed_setting(tmp_path):
    base = plan(load_pipeline(DIGITS, TINY), Storage(str(tmp_path)))
    changed = plan(load_pipeline(DIGITS, [*TINY, "reverse_loss.recon=0.5"]), Storage(str(tmp_path)))
    same = [a.name for a, b in zip(base, changed) if a.key == b.key]
    assert same == ["prepare", "train_forward"]
    workers = plan(load_pipeline(DIGITS, [*TINY, "train_forward.num_workers=2", "train_forward.log_every=3"]),
                   Storage(str(tmp_path)))
    assert [p.key for p in workers] == [p.key for p in base]  # execution settings are not part of a key


# ---------------------------------------------------------------- end to end
def test_a_run_records_parent_child_runs_metrics_and_artifacts_in_mlflow(first_run):
    storage = first_run
    c, runs = runs_of(storage)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(STEPS)
    assert all(r.info.status == "FINISHED" and r.data.tags["biflow.cache"] == "miss" for r in children.values())
    assert all(len(r.data.tags["biflow.ray_node"]) == 56 for r in children.values())  # the Ray node that ran the step
    # the flat config as params, with stable dotted names
    assert parent.data.params["forward.size"] == "tiny" and parent.data.params["train_reverse.steps"] == "12"
    assert children["train_reverse"].data.params["reverse_loss.strategy"] == "hidden_alignment"
    # training curves: loss terms, bits/dim, per-block state norms, learning rate, throughput
    fwd = children["train_forward"].info.run_id
    assert [m.step for m in c.get_metric_history(fwd, "train/loss")] == [4, 8, 12]
    for name in ("train/nll_noisy_bpd", "train/state_rms/0", "train/lr", "train/images_per_s", "test/bits_per_dim",
                 "test/nll_noisy_bpd"):
        assert name in children["train_forward"].data.metrics, name
    for name in ("train/loss", "train/recon", "train/align", "train/lr"):
        assert name in children["train_reverse"].data.metrics, name
    # evaluation per sampler, on the evaluate run and summarised on the parent
    for sampler, nfe in (("1nfe", 1), ("exact", None)):
        for metric in ("fd_evaluator", "class_acc", "ms_per_image", "nfe"):
            assert f"{sampler}/{metric}" in children["evaluate"].data.metrics
            assert f"{sampler}/{metric}" in parent.data.metrics
        if nfe is not None:
            assert parent.data.metrics[f"{sampler}/nfe"] == nfe
    assert parent.data.metrics["exact/nfe"] > 1 and "speedup/exact_over_1nfe" in parent.data.metrics

    def artifacts(run_id, path=None):
        return {a.path for a in c.list_artifacts(run_id, path)}

    assert artifacts(fwd, "checkpoints") == {"checkpoints/forward.pt"}
    assert artifacts(children["train_reverse"].info.run_id, "checkpoints") == {"checkpoints/reverse.pt"}
    assert {"samples/samples_1nfe.png", "samples/samples_exact.png", "samples/side_by_side.png"} <= \
        artifacts(children["evaluate"].info.run_id, "samples")
    assert {"fid_vs_speed.png", "report.json", "report.md"} <= artifacts(children["report"].info.run_id)
    assert {"fid_vs_speed.png", "report.json", "report.md"} <= artifacts(parent.info.run_id)
    # the reverse model is in the registry and loads back
    versions = c.search_model_versions("name='biflow-reverse'")
    assert any(v.run_id == children["train_reverse"].info.run_id for v in versions)


def test_the_report_lands_under_the_storage_with_its_plot(first_run):
    report_dir = next((first_run / "report").iterdir())
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["samplers"]) == {"1nfe", "exact"}
    assert report["samplers"]["1nfe"]["nfe"] == 1 and report["samplers"]["exact"]["nfe"] > 1
    assert (report_dir / "fid_vs_speed.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1nfe | 1 |" in (report_dir / "report.md").read_text()
    assert (report_dir / RECORD).is_file()
    assert not any((first_run / "_work").glob("*/*")), "a finished step keeps no resumable state"


def test_a_second_run_executes_no_step_and_links_cache_hits(first_run, capsys):
    code, out, _ = run_cli(capsys, "run", str(DIGITS), *sets(first_run))
    assert code == 0
    assert table(out) == {s: "cached" for s in STEPS}
    assert "0 step(s) ran" in out and "report:" in out
    c, runs = runs_of(first_run)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][-1]
    hits = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(hits) == sorted(STEPS) and all(r.data.tags["biflow.cache"] == "hit" for r in hits.values())
    producers = {r.info.run_id for r in runs if r.data.tags.get("biflow.cache") == "miss"}
    assert all(r.data.tags["biflow.source_run_id"] in producers for r in hits.values())
    assert "1nfe/fd_evaluator" in parent.data.metrics  # the compare view lines cached runs up too
    code, out, _ = run_cli(capsys, "status", str(DIGITS), *sets(first_run))
    assert code == 0 and "everything is cached" in out


def test_changing_a_reverse_setting_reruns_train_reverse_evaluate_and_report_only(first_run, capsys):
    code, out, _ = run_cli(capsys, "status", str(DIGITS), *sets(first_run, "train_reverse.lr=5e-4"))
    assert "3 step(s) would run: train_reverse, evaluate, report" in out
    code, out, _ = run_cli(capsys, "run", str(DIGITS), *sets(first_run, "train_reverse.lr=5e-4"))
    assert code == 0
    assert table(out) == {"prepare": "cached", "train_forward": "cached", "train_reverse": "ran", "evaluate": "ran",
                          "report": "ran"}


def test_force_train_forward_reruns_it_and_everything_downstream(first_run, capsys):
    code, out, _ = run_cli(capsys, "run", str(DIGITS), *sets(first_run), "--force", "train_forward")
    assert code == 0
    assert table(out) == {"prepare": "cached", **{s: "ran" for s in STEPS[1:]}}
    code, out, _ = run_cli(capsys, "run", str(DIGITS), *sets(first_run))  # and the cache is whole again
    assert table(out) == {s: "cached" for s in STEPS}


def test_two_runs_of_one_config_at_once_compute_each_step_once(tmp_path, capsys):
    from biflow.pipeline.runner import run_pipeline

    cfg = load_pipeline(DIGITS, [*TINY, f"pipeline.storage={tmp_path}"])
    results, errors = [], []

    def go():
        try:
            results.append(run_pipeline(cfg, label="digits", echo=lambda *_: None))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    ran = sorted(o.name for r in results for o in r.outcomes if o.status == "ran")
    assert ran == sorted(STEPS)  # each step computed exactly once over both runs
    other = [o.status for r in results for o in r.outcomes if o.status != "ran"]
    assert all(s.startswith("cached") for s in other)
    storage = storage_for(cfg)
    for p in plan(cfg, storage):
        assert p.action == "cached"
        assert sorted(os.listdir(tmp_path / p.name)) == [p.key]  # one output directory per step, no debris
        assert not [f for f in os.listdir(tmp_path / p.name / p.key) if f.startswith(".")]


# ------------------------------------------------------------------ crashes
KILL_SCRIPT = textwrap.dedent("""
    import sys
    from biflow.pipeline.runner import execute_step, plan, storage_for
    from biflow.pipeline.spec import load_pipeline
    cfg = load_pipeline(sys.argv[1], sys.argv[2:])
    p = plan(cfg, storage_for(cfg))[0]
    execute_step(p.payload(cfg, storage_for(cfg), None))
""")


def test_a_step_killed_mid_write_leaves_no_record_and_no_visible_output(tmp_path):
    overrides = [f"pipeline.storage={tmp_path}", "data.name=patches", "data.image_size=16",
                 "data.patches_per_image=2000", "data.rows_per_shard=200"]
    cfg = load_pipeline(DIGITS, overrides)
    step = plan(cfg, storage_for(cfg))[0]
    staging = tmp_path / "_work" / "prepare" / step.key / "out" / "data" / "train"
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(DIGITS), *overrides])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("part-*.parquet"))) < 3:  # some shards are written
        assert child.poll() is None, "the step finished before it could be killed; make it bigger"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    storage = storage_for(cfg)
    assert storage.read_record("prepare", step.key) is None
    assert not (tmp_path / "prepare" / step.key).exists()  # outputs appear only whole, with the record
    assert plan(cfg, storage)[0].action == "run"
    # the rerun completes, and what it publishes is complete and consistent with its record
    out = execute_step({"name": "prepare", "key": step.key, "config": cfg.model_dump(), "storage": storage.root,
                        "local_dir": None, "parent": None, "force": False, "inputs": {}, "step_config": step.config,
                        "code": step.code})
    assert out["status"] == "ran"
    record = storage.read_record("prepare", step.key)
    assert record is not None and record["files"]
    from biflow.data import load_split

    assert len(load_split(tmp_path / "prepare" / step.key / "data", "train")) > 0


def test_a_record_whose_outputs_were_deleted_counts_as_not_done(first_run):
    cfg = load_pipeline(DIGITS, [*TINY, f"pipeline.storage={first_run}"])
    storage = storage_for(cfg)
    report = plan(cfg, storage)[-1]
    assert report.action == "cached"
    png = first_run / "report" / report.key / "fid_vs_speed.png"
    data = png.read_bytes()
    png.unlink()
    try:
        assert plan(cfg, storage)[-1].action == "run"
    finally:
        png.write_bytes(data)
    assert plan(cfg, storage)[-1].action == "cached"


# ---------------------------------------------------------------- bad input
def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("biflow ")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_invalid_pipeline_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("forward:\n  widht: 64\n")
    assert "forward.widht" in one_line_error(capsys, "run", str(bad))
    bad.write_text("pipeline:\n  evaluate:\n    samplers: [1nfe, magic]\n")
    assert "samplers" in one_line_error(capsys, "run", str(bad))
    assert "not found" in one_line_error(capsys, "run", str(tmp_path / "missing.yaml"))


def test_an_unknown_step_in_force_is_a_one_line_error(tmp_path, capsys):
    msg = one_line_error(capsys, "run", str(DIGITS), *sets(tmp_path), "--force", "train_everything")
    assert "train_everything" in msg and "train_forward" in msg


def test_an_unreachable_ray_address_is_a_one_line_error(tmp_path, capsys):
    t0 = time.time()
    msg = one_line_error(capsys, "run", str(DIGITS), *sets(tmp_path), "--address", "127.0.0.1:9")
    assert "unreachable" in msg and "127.0.0.1:9" in msg and time.time() - t0 < 30


def test_an_unreachable_tracking_uri_is_a_one_line_error(tmp_path, capsys):
    t0 = time.time()
    msg = one_line_error(capsys, "run", str(DIGITS), *sets(tmp_path, "pipeline.tracking_uri=http://127.0.0.1:9"))
    assert "unreachable" in msg and time.time() - t0 < 30


def test_ui_serves_the_configured_store_on_localhost(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    code, out, _ = run_cli(capsys, "ui", "--set", f"pipeline.storage={tmp_path}", "--port", "5123")
    assert code == 0 and len(calls) == 1
    cmd = calls[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"


def test_object_store_storage_publishes_then_records_and_fetches_a_local_copy(tmp_path):
    """The pyarrow.fs code path (S3, GCS, ...), exercised through a file:// URI."""
    storage = Storage(f"file://{tmp_path / 'remote'}", local_dir=str(tmp_path / "local"))
    assert not storage.is_local
    storage.check_writable()
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.bin").write_bytes(b"x" * 1000)
    (staging / "sub" / "b.txt").write_text("hello")
    assert storage.read_record("step", "k1") is None
    record = storage.publish("step", "k1", staging, {"result": {"n": 1}})
    assert record["files"] == {"a.bin": 1000, "sub/b.txt": 5}
    assert (tmp_path / "remote" / "step" / "k1" / RECORD).is_file()
    assert storage.read_record("step", "k1")["result"] == {"n": 1}
    import shutil

    shutil.rmtree(tmp_path / "local")  # another machine: outputs are downloaded on first use
    local = storage.fetch("step", "k1")
    assert (local / "sub" / "b.txt").read_text() == "hello" and local.is_relative_to(tmp_path / "local")


def test_storage_tracking_and_artifact_locations_resolve_to_absolute_uris(tmp_path, monkeypatch):
    from biflow.pipeline.spec import resolve_artifact_location, resolve_storage, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(DIGITS, ["pipeline.storage=store"])
    assert resolve_storage(cfg) == str(tmp_path / "store")
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert resolve_artifact_location(cfg) == (tmp_path / "store" / "mlartifacts").as_uri()
    for given in ("s3://bucket/biflow", "mlflow-artifacts:/biflow"):  # remote stores pass through unchanged
        assert resolve_artifact_location(load_pipeline(DIGITS, [f"pipeline.artifact_location={given}"])) == given
    assert resolve_artifact_location(load_pipeline(DIGITS, ["pipeline.artifact_location=arts"])) == \
        (tmp_path / "arts").as_uri()


def test_gpu_settings_on_a_local_ray_without_gpus_are_a_one_line_error_not_a_hang():
    from biflow.errors import UserError
    from biflow.pipeline.ray_session import check_local_gpus, gpu_settings

    cfg = load_pipeline(DIGITS, [*TINY, "pipeline.train_reverse.use_gpu=true", "pipeline.evaluate.gpus=1"])
    assert gpu_settings(cfg, ["prepare", "train_forward", "train_reverse", "evaluate"]) == \
        ["pipeline.train_reverse.use_gpu", "pipeline.evaluate.gpus"]
    assert gpu_settings(cfg, ["prepare", "train_forward"]) == []  # cached GPU steps ask for nothing
    with pytest.raises(UserError, match=r"pipeline.train_reverse.use_gpu, pipeline.evaluate.gpus asks for a GPU"):
        check_local_gpus(cfg, ["train_reverse", "evaluate"], gpus=0)
    check_local_gpus(cfg, ["train_reverse", "evaluate"], gpus=1)


def test_a_stage_trains_to_the_same_weights_whatever_its_process_ran_before(tmp_path):
    """Ray reuses worker processes: the initial weights must come from the config's seed, not the RNG's history."""
    import dataclasses

    import torch

    from biflow.checkpoint import read_checkpoint
    from biflow.config import ExperimentConfig
    from biflow.data import prepare
    from biflow.data.model_space import TrainingData
    from biflow.pipeline.raytrain import StageJob, train_in_process

    cfg = load_pipeline(DIGITS, [*TINY, "train_forward.steps=3"])
    data = TrainingData.open(prepare(cfg.data, tmp_path / "data"))
    job = StageJob("forward", ExperimentConfig.model_validate(cfg.model_dump(exclude={"pipeline"})), data, str(tmp_path / "a"))
    states = []
    for work, noise in (("a", 1), ("b", 1000)):
        torch.randn(noise)  # whatever ran before in this process
        ckpt, _ = train_in_process(dataclasses.replace(job, work_dir=str(tmp_path / work)), threads=1)
        states.append(read_checkpoint(ckpt)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
