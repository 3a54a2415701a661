"""Search-space files: every problem is a one-line error before anything runs; the shipped spaces are valid.

No Ray here: parsing, validation, cases, the Pareto front, the ablation table and the best-pipeline
file are plain functions. The sweeps themselves run in test_sweep.py.
"""
from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from biflow.cli import main
from biflow.config import ConfigError
from biflow.pipeline.spec import load_pipeline
from biflow.sweep.report import ablation_table, best_pipeline, best_trial, mark_pareto, pareto_front
from biflow.sweep.runner import raw_pipeline, uses_base_forward
from biflow.sweep.loading import load_space

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"
SPACES = ROOT / "tune_spaces"


@pytest.fixture(scope="module")
def base() -> dict:
    return raw_pipeline(DIGITS)[1]


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------- shipped spaces
@pytest.mark.parametrize("name, trials, shared_forward", [
    ("inverse_loss", 16, True), ("architecture", 12, True), ("forward", 6, False), ("ablation", 8, True)])
def test_every_shipped_space_validates_against_the_digits_pipeline(base, name, trials, shared_forward):
    space = load_space(SPACES / f"{name}.yaml", base)
    assert space.num_trials() == trials
    assert uses_base_forward(space, base, space.trial_config(base, {}, "sweep")) is shared_forward
    assert space.spec.description  # readable by a person: each file says what it explores


def test_the_ablation_space_lays_out_the_papers_table(base):
    space = load_space(SPACES / "ablation.yaml", base)
    rows = {(r.section, r.case): r.paper for r in space.spec.table.rows}
    assert rows[("alignment strategy", "exact")] == 44.46
    assert rows[("alignment strategy", "naive_distillation")] == 43.41
    assert rows[("alignment strategy", "hidden_distillation")] == 55.00
    assert rows[("alignment strategy", "hidden_alignment")] == 36.93
    assert rows[("denoising", "hidden_alignment")] == 31.88
    assert rows[("denoising", "score_denoising")] == 42.62
    assert rows[("denoising", "no_denoising")] == 100.51
    assert rows[("norm control", "no_norm_control")] == 45.54
    assert rows[("distance", "hidden_alignment")] == 31.88 and rows[("distance", "perceptual_combined")] == 2.46
    combined = space.trial_config(base, {"row": "perceptual_combined"}).reverse_loss  # random_conv stand-ins, two seeds
    assert [(t.net, t.weight, t.seed) for t in combined.perceptual_list()] == [("random_conv", 0.4, 0), ("random_conv", 0.1, 1)]
    assert space.spec.scheduler.type == "fifo"  # an ablation compares complete runs
    # coupled settings: hidden distillation feeds the heads back, and the trial config says so
    cfg = space.trial_config(base, {"row": "hidden_distillation"})
    assert cfg.reverse_loss.strategy == "hidden_distillation" and cfg.reverse.head_feedback is True
    assert space.trial_config(base, {"row": "no_norm_control"}).forward.clip is None
    assert space.trial_config(base, {"row": "hidden_alignment"}).train_reverse.steps == space.spec.steps


def test_a_swept_size_fills_the_fields_the_pipeline_file_leaves_out(tmp_path, base):
    space = load_space(write(tmp_path, """
        fixed: {forward.size: tiny}   # 2 blocks: the tiny reverse model's 3 layers make its 3 segments
        params:
          reverse.size: {choice: [tiny, digits]}
          reverse_loss.adaptive_p: {uniform: [0.0, 1.5]}
        """), base)
    assert space.trial_config(base, {"reverse.size": "tiny", "reverse_loss.adaptive_p": 0.5}).reverse.width == 32
    assert space.trial_config(base, {"reverse.size": "digits", "reverse_loss.adaptive_p": 0.5}).reverse.width == 64
    tune_space = space.param_space()["params"]
    assert set(tune_space) == {"reverse.size", "reverse_loss.adaptive_p"}


def test_the_pipeline_data_is_the_file_with_the_overrides_applied(base):
    """One reading of the pipeline file gives both the config and the data trials are built from."""
    cfg, data = raw_pipeline(DIGITS, ["reverse.size=tiny", "pipeline.evaluate.guidance=1.0"])
    expected = copy.deepcopy(base)
    expected["reverse"]["size"] = "tiny"
    expected["pipeline"].setdefault("evaluate", {})["guidance"] = 1.0
    assert data == expected
    assert cfg.reverse.width == 32 and cfg.pipeline.evaluate.guidance == 1.0


def test_a_sweep_value_and_a_set_are_applied_and_blamed_the_same_way(tmp_path, base):
    """An axis value goes through the same apply_overrides as --set: the same error, after its own source."""
    space = load_space(write(tmp_path, "params:\n  reverse_loss.align: {grid: [1.0]}\n"), base)
    with pytest.raises(ConfigError) as from_trial:
        space.trial_config(base, {"reverse_loss.align": -1.0}, "trial")
    with pytest.raises(ConfigError) as from_set:
        load_pipeline(DIGITS, ["reverse_loss.align=-1.0"])
    problem = "Input should be greater than or equal to 0"
    assert str(from_trial.value) == f"trial: reverse_loss.align: {problem}"
    assert str(from_set.value) == f"--set reverse_loss.align=-1.0: {problem}"


def test_a_misspelt_set_in_a_sweep_is_blamed_on_the_set(tmp_path, capsys):
    space = write(tmp_path, "params:\n  reverse_loss.align: {grid: [1.0]}\n")
    code = main(["sweep", str(space), "--pipeline", str(DIGITS), "--set", "train_reverse.stpes=10", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err == "biflow sweep: error: --set train_reverse.stpes=10: unknown key 'stpes' (did you mean 'steps'?)\n"


# ------------------------------------------------------------------- errors
BAD = [
    ("unknown key", "params:\n  reverse.dpth: {choice: [4, 6]}\n", "params.reverse.dpth: unknown config key; did you mean reverse.depth?"),
    ("empty range", "params:\n  reverse_loss.align: {uniform: [2.0, 1.0]}\n", "params.reverse_loss.align: empty range [2.0, 1.0]"),
    ("equal ends", "params:\n  reverse_loss.align: {loguniform: [1.0, 1.0]}\n", "empty range [1.0, 1.0]"),
    ("log of zero", "params:\n  reverse_loss.align: {loguniform: [0.0, 1.0]}\n", "loguniform needs 0 < lo"),
    ("unknown distribution", "params:\n  reverse_loss.align: {normal: [0, 1]}\n",
     "unknown distribution 'normal'; known: choice, grid, uniform, loguniform"),
    ("empty choice", "params:\n  reverse_loss.align: {choice: []}\n", "empty choice"),
    ("empty grid", "params:\n  reverse_loss.align: {grid: []}\n", "empty grid"),
    ("two distributions", "params:\n  reverse_loss.align: {choice: [1], grid: [2]}\n", "expected one distribution"),
    ("randint of floats", "params:\n  reverse.depth: {randint: [5.0, 9.5]}\n", "randint takes integers"),
    ("no multiple of q", "params:\n  reverse.depth: {qrandint: [5, 7, 8]}\n", "no multiple of 8 in [5, 7]"),
    ("value the model rejects", "params:\n  reverse_loss.strategy: {choice: [hidden_alignment, nope]}\n",
     "params.reverse_loss.strategy: value 'nope' gives an invalid trial: reverse_loss.strategy: Input should be"),
    ("value out of range", "params:\n  reverse_loss.align: {uniform: [-1.0, 1.0]}\n",
     "value -1.0 gives an invalid trial: reverse_loss.align: Input should be greater than or equal to 0"),
    ("uncoupled strategy", "params:\n  reverse_loss.strategy: {choice: [hidden_alignment, hidden_distillation]}\n",
     "needs reverse.head_feedback=True (set both in one `cases` entry)"),
    ("combination", "params:\n  reverse.width: {grid: [64, 40]}\n  reverse.heads: {grid: [4, 16]}\n",
     "the combination reverse.width=40, reverse.heads=16 gives an invalid trial: reverse: width 40 is not divisible by heads 16"),
    ("segments of another flow", "params:\n  reverse.segment_layers: {choice: [[2, 2, 2]]}\n", "must have num_blocks + 1 = 5 entries"),
    ("data key", "params:\n  data.name: {choice: [digits, patches]}\n", "data settings cannot be swept"),
    ("case key", "params:\n  s:\n    cases:\n      a: {reverse_loss.stratgy: naive_distillation}\n",
     "params.s.a.reverse_loss.stratgy: unknown config key; did you mean reverse_loss.strategy?"),
    ("case axis named like a key", "params:\n  reverse.depth:\n    cases:\n      a: {reverse.width: 32}\n", "not a config key"),
    ("owned twice", "fixed: {reverse_loss.align: 1.0}\nparams:\n  reverse_loss.align: {grid: [0.5, 2.0]}\n",
     "reverse_loss.align is also set by fixed"),
    ("unknown top-level key", "paramz: {}\nparams:\n  reverse_loss.align: {grid: [1.0]}\n", "paramz: Extra inputs are not permitted"),
    ("unknown scheduler", "scheduler: {type: pbt}\nparams:\n  reverse_loss.align: {grid: [1.0]}\n", "scheduler.type: Input should be"),
    ("grace beyond the steps", "steps: 100\nscheduler: {grace_period: 200}\nparams:\n  reverse_loss.align: {grid: [1.0]}\n",
     "grace_period 200 exceeds the trials' 100 steps"),
    ("fid without inception", "metric: fid\nevaluate: {features: evaluator}\nparams:\n  reverse_loss.align: {grid: [1.0]}\n",
     "metric fid needs evaluate.features=inception"),
    ("unknown evaluate key", "evaluate: {num_sample: 5}\nparams:\n  reverse_loss.align: {grid: [1.0]}\n",
     "evaluate.num_sample: unknown pipeline.evaluate setting; did you mean num_samples?"),
    ("table case", "params:\n  s:\n    cases: {a: {}}\ntable:\n  axis: s\n  rows: [{section: x, row: y, case: b}]\n",
     "table.rows[0].case 'b' is not a case of s"),
    ("no params", "metric: fd_evaluator\n", "params: Field required"),
]


@pytest.mark.parametrize("what, text, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_space_is_a_one_line_error_naming_the_file_and_the_key(tmp_path, base, what, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path, base)
    msg = str(err.value)
    assert message in msg, msg
    assert msg.startswith(str(path)) and "\n" not in msg


def test_the_cli_rejects_a_bad_space_before_anything_runs(tmp_path, capsys):
    storage = tmp_path / "store"
    space = write(tmp_path, "params:\n  reverse_loss.align: {gaussian: [0, 1]}\n")
    code = main(["sweep", str(space), "--pipeline", str(DIGITS), "--set", f"pipeline.storage={storage}"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown distribution 'gaussian'" in err and len(err.strip().splitlines()) == 1
    assert not storage.exists()  # no cache, no MLflow store, no Ray: nothing ran


def test_dry_run_lists_the_trials(capsys):
    assert main(["sweep", str(SPACES / "ablation.yaml"), "--pipeline", str(DIGITS), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 trial(s)" in out and "no_norm_control" in out and "perceptual_combined" in out and "ok:" in out


def test_resume_without_an_earlier_run_says_so(tmp_path, capsys):
    space = write(tmp_path, "params:\n  reverse_loss.align: {grid: [1.0]}\n")
    code = main(["sweep", str(space), "--pipeline", str(DIGITS), "--set", f"pipeline.storage={tmp_path / 'store'}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to resume" in err


# -------------------------------------------------------------------- report
def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    pts = [(1.0, 10.0), (2.0, 5.0), (3.0, 6.0), (0.5, 20.0), (2.0, 5.0), (4.0, 1.0)]
    assert pareto_front(pts) == [True, True, False, True, True, True]


def _row(trial_id, case, fd, ms, status="finished"):
    return {"trial_id": trial_id, "label": case, "status": status, "values": {"row": case},
            "fd_evaluator": fd if status == "finished" else None, "ms_per_image": ms, "nfe": 1}


def test_the_ablation_table_puts_our_numbers_beside_the_papers(base):
    space = load_space(SPACES / "ablation.yaml", base)
    rows = [_row("t0", "hidden_alignment", 10.0, 0.1), _row("t1", "hidden_alignment", 12.0, 0.1),
            _row("t2", "naive_distillation", 14.0, 0.1), _row("t3", "no_denoising", None, None, "failed"),
            {"trial_id": "exact", "label": "exact inverse", "status": "finished", "values": {}, "fd_evaluator": 9.0,
             "ms_per_image": 3.0, "nfe": 62}]
    mark_pareto(rows, "fd_evaluator")
    assert [r["pareto"] for r in rows] == [True, False, False, False, True]
    assert best_trial(rows, "fd_evaluator")["trial_id"] == "t0"  # the reference is not a trial
    md, table = ablation_table(space, rows, "fd_evaluator", "digits")
    lines = md.splitlines()
    exact = next(ln for ln in lines if "exact inverse" in ln)
    assert "| alignment strategy |" in exact and "44.46" in exact and "| 9 |" in exact and "reference" in exact
    assert "| 55.00 |" in next(ln for ln in lines if "| hidden distillation |" in ln)
    hidden = next(ln for ln in lines if "| hidden alignment |" in ln)
    assert "36.93" in hidden and "11 ± 1.4" in hidden and "2/2" in hidden
    assert "— (failed)" in next(ln for ln in lines if "| none |" in ln)
    assert "— (not run)" in next(ln for ln in lines if "normalisation off" in ln)
    assert sum(ln.startswith("| denoising |") for ln in lines) == 1  # each section named once
    assert {r["setting"]: r["ours"] for r in table}["learned"] == 11.0


def test_the_best_trial_becomes_a_runnable_pipeline_file(tmp_path, base):
    space = load_space(SPACES / "inverse_loss.yaml", base)
    values = {"reverse_loss.align": 0.3, "reverse_loss.recon": 2.0, "reverse_loss.perceptual": 0.1,
              "reverse_loss.adaptive_p": 0.5, "reverse_loss.adaptive_c": 0.05, "reverse_loss.normalize": False,
              "reverse.w_max": 1.5}
    row = {"trial_id": "abc_00003", "values": values, "fd_evaluator": 12.5, "ms_per_image": 0.2, "steps_trained": 600}
    path = tmp_path / "best.yaml"
    path.write_text(best_pipeline(space, base, row, "fd_evaluator", DIGITS, "inverse_loss-x/run-1"))
    cfg = load_pipeline(path)
    assert cfg.reverse_loss.align == 0.3 and cfg.reverse_loss.normalize is False and cfg.reverse.w_max == 1.5
    assert cfg.train_reverse.steps == 600 and cfg.pipeline.experiment == "biflow-digits"
    assert cfg.pipeline.evaluate.num_samples == 1000  # the sweep's evaluation overrides are not written back
    assert path.read_text().startswith("# Best trial of sweep inverse_loss-x/run-1")


def test_a_sweep_whose_driver_died_is_closed_in_mlflow_by_the_next_invocation(tmp_path):
    """A killed driver leaves its runs RUNNING; the next `biflow sweep` of that space ends them KILLED (resumable)."""
    import json

    from biflow.pipeline.tracking import Tracker, start_child
    from biflow.sweep.rundir import close_if_dead, hold

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", (tmp_path / "art").as_uri())
    parent = tracker.start_parent("sweep", {}, {"biflow.kind": "sweep"})
    child = start_child(parent.ref, "trial", {"biflow.kind": "trial", "biflow.trial_id": "x_00000"})
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    (run_dir / "sweep.json").write_text(json.dumps({"parent_run_id": parent.run_id, "status": "running"}))
    held = hold(run_dir)  # the driver is alive: nothing is touched
    close_if_dead(run_dir, tracker)
    assert tracker.client.get_run(parent.run_id).info.status == "RUNNING"
    held.close()  # the driver died
    close_if_dead(run_dir, tracker)
    assert tracker.client.get_run(parent.run_id).info.status == "KILLED"
    assert tracker.client.get_run(child.run_id).info.status == "KILLED"
    assert tracker.client.get_run(child.run_id).data.tags["biflow.trial.status"] == "interrupted"
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "interrupted"


def test_a_sweep_over_several_nodes_with_an_object_store_root_is_refused(tmp_path, monkeypatch):
    """Tune's state and trial checkpoints would sit on the driver's disk, out of reach of the other nodes."""
    import ray

    from biflow.errors import UserError
    from biflow.pipeline.cache import Storage
    from biflow.sweep.tune_setup import check_sweep_storage

    remote = Storage(f"file://{tmp_path / 'remote'}", local_dir=str(tmp_path / "local"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(UserError, match="a sweep on 2 nodes needs a shared filesystem"):
        check_sweep_storage(remote)
    check_sweep_storage(Storage(str(tmp_path / "nfs")))  # a shared path is fine on many nodes
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_sweep_storage(remote)  # and an object store on one machine


def test_the_trial_callbacks_listener_is_an_attribute_left_out_of_tunes_saved_state(base):
    """Tests hook into a sweep through TrialRuns(listener=...), not a module global; Tune pickles the callback
    into its experiment state, and the listener (often a closure) stays behind."""
    import pickle

    from biflow.pipeline.tracking import RunRef
    from biflow.sweep.tracking import TrialRuns

    def hook(event, trial):
        pass

    space = load_space(SPACES / "inverse_loss.yaml", base)
    callback = TrialRuns(RunRef("sqlite:///mlflow.db", "0", "run"), space, base, "sweep.json", "fd_evaluator", listener=hook)
    assert callback.listener is hook
    assert pickle.loads(pickle.dumps(callback)).listener is None
