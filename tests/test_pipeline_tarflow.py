"""A pipeline whose stage 1 is an apple/ml-tarflow model: `pipeline.forward_checkpoint` makes the import the
`train_forward` step's cached output, and stage 2 and the evaluation run on it as usual (tiny sizes, local Ray).

The reference model is trained for a few steps on the digits by benchmarks/train_tarflow_digits.py (the script a
user would run at a few hundred steps); the tests skip, saying why, where the reference is absent.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from biflow.checkpoint import load_checkpoint, read_checkpoint
from biflow.cli import main
from biflow.pipeline.cache import Storage
from biflow.pipeline.runner import plan
from biflow.pipeline.spec import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"
TINY = [
    "reverse.size=tiny", "train_reverse.steps=12", "train_reverse.batch_size=32", "train_reverse.log_every=4",
    "train_reverse.ckpt_every=6", "pipeline.evaluate.num_samples=24", "pipeline.evaluate.batch_size=24",
    "pipeline.evaluate.timing_batch=8", "pipeline.evaluate.timing_repeats=1", "pipeline.evaluate.grid=16",
    "pipeline.train_reverse.cpus=1",
]


def _script():
    spec = importlib.util.spec_from_file_location("train_tarflow_digits", ROOT / "benchmarks" / "train_tarflow_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tarflow_ckpt(tmp_path_factory) -> Path:
    """An ml-tarflow digits model (2 blocks x 1 layer, width 64) after 20 training steps, saved as {"model": ...}."""
    script = _script()
    where = script.reference_dir()
    if not (where / "transformer_flow.py").is_file():
        pytest.skip(f"ml-tarflow reference not found at {where} (set ML_TARFLOW to a clone of apple/ml-tarflow)")
    root = tmp_path_factory.mktemp("tarflow")
    return script.train_reference(root / "tarflow_digits.pth", steps=20, blocks=2, layers=1, batch=32,
                                  data_dir=root / "data", log_every=0)


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_the_imported_flow_is_stage_1_and_stage_2_and_evaluate_run_on_it(tarflow_ckpt, tmp_path, local_ray, capsys):
    """`biflow run` with pipeline.forward_checkpoint: train_forward imports (0 training steps) the flow the reference
    trained, train_reverse trains G against it, evaluate scores both samplers, the report records it."""
    storage = tmp_path / "runs"
    argv = ["run", str(DIGITS), *sets(*TINY, f"pipeline.storage={storage}", f"pipeline.forward_checkpoint.path={tarflow_ckpt}")]
    assert main(argv) == 0, capsys.readouterr().err
    store = Storage(str(storage))
    steps = {p.name: p for p in plan(load_pipeline(DIGITS, [*TINY, f"pipeline.storage={storage}",
                                                          f"pipeline.forward_checkpoint.path={tarflow_ckpt}"]), store)}
    assert all(p.action == "cached" for p in steps.values())
    fwd = steps["train_forward"].record["result"]
    assert fwd["training"]["steps"] == 0 and fwd["training"]["imported"]["from"] == "tarflow"
    forward_pt = store.fetch("train_forward", steps["train_forward"].key) / fwd["checkpoint"]
    flow = load_checkpoint(forward_pt)
    assert (flow.cfg.final_norm, flow.cfg.gelu, flow.cfg.null_label, flow.cfg.num_blocks) == (False, "exact", "mean", 2)
    assert read_checkpoint(forward_pt)["imported"]["source"] == str(tarflow_ckpt)
    rev = steps["train_reverse"].record["result"]
    reverse_pt = store.fetch("train_reverse", steps["train_reverse"].key) / rev["checkpoint"]
    assert read_checkpoint(reverse_pt)["forward_checkpoint"].endswith("forward.pt") and rev["training"]["steps"] == 12
    report = json.loads((store.fetch("report", steps["report"].key) / "report.json").read_text())
    assert set(report["samplers"]) == {"1nfe", "exact"} and report["forward"]["steps"] == 0
    for sampler in report["samplers"].values():
        assert 0.0 <= sampler["class_acc"] <= 1.0 and sampler["ms_per_image"] > 0
    # the weights are the trained reference's (a reversed block's positions flipped into the block's order)
    state = torch.load(tarflow_ckpt, weights_only=True)["model"]
    assert torch.equal(flow.blocks[1].pos, state["blocks.1.pos_embed"].flip(0))


def test_the_train_forward_key_follows_the_source_files_content_not_its_path(tarflow_ckpt, tmp_path):
    """Same bytes elsewhere: same keys. Other bytes: train_forward and everything after it get new keys. No import:
    the key of every step is what it was without the section."""
    def keys(*extra: str) -> dict[str, str]:
        return {p.name: p.key for p in plan(load_pipeline(DIGITS, [*TINY, *extra]), Storage(str(tmp_path / "s")))}

    moved = tmp_path / "elsewhere.pth"
    shutil.copyfile(tarflow_ckpt, moved)
    base = keys(f"pipeline.forward_checkpoint.path={tarflow_ckpt}")
    assert keys(f"pipeline.forward_checkpoint.path={moved}") == base
    state = torch.load(moved, weights_only=True)
    state["model"]["blocks.0.proj_out.bias"] += 1e-3
    torch.save(state, moved)
    changed = keys(f"pipeline.forward_checkpoint.path={moved}")
    assert [s for s in base if base[s] == changed[s]] == ["prepare"]
    assert keys(f"pipeline.forward_checkpoint.path={tarflow_ckpt}", "pipeline.forward_checkpoint.noise_std=0.1")[
        "train_forward"] != base["train_forward"]
    plain = keys()
    assert plain["train_forward"] != base["train_forward"] and plain["prepare"] == base["prepare"]


def test_a_missing_source_or_a_flow_of_other_images_is_a_one_line_error(tarflow_ckpt, tmp_path, local_ray, capsys):
    """A path that is not a file fails when the pipeline is read; a flow of 3-channel images fails the import step
    with one line naming both geometries."""
    code = main(["status", str(DIGITS), *sets(f"pipeline.storage={tmp_path}", "pipeline.forward_checkpoint.path=/no/such.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "pipeline.forward_checkpoint.path /no/such.pth is not a file" in err
    script = _script()
    tf = script.reference_module()
    torch.save(tf.Model(3, 8, 2, 64, 2, 1, num_classes=10).state_dict(), tmp_path / "rgb.pth")
    code = main(["run", str(DIGITS), *sets(*TINY, f"pipeline.storage={tmp_path / 'runs'}",
                                           f"pipeline.forward_checkpoint.path={tmp_path / 'rgb.pth'}")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("biflow ")]
    assert code == 2 and len(lines) == 1, err
    assert "the flow models 3x8x8 images, the data has 1x8x8" in lines[0]
