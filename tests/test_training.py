"""Stage-1 training loop: it learns, it resumes, and it fails loudly instead of silently."""
from __future__ import annotations

import pytest
import torch

from biflow.checkpoint import load_checkpoint, read_checkpoint
from biflow.config import ForwardConfig, TrainConfig
from biflow.errors import CheckpointError
from biflow.models import ForwardFlow
from biflow.training.forward import forward_step
from biflow.training.loop import TrainingDiverged, fit, lr_factor


def toy_batches(start: int, n: int = 32):
    """Endless batches of a fixed 4x4 two-class toy dataset."""
    gen = torch.Generator().manual_seed(start)
    while True:
        y = torch.randint(0, 2, (n,), generator=gen)
        x = torch.randn(n, 1, 4, 4, generator=gen) * 0.3 + (y.view(-1, 1, 1, 1) * 2 - 1) * 0.5
        yield x, y


def tiny_setup(steps: int, **train):
    cfg = ForwardConfig(size="tiny", image_size=4, patch_size=2, in_channels=1, num_classes=2)
    tcfg = TrainConfig(steps=steps, batch_size=32, warmup_steps=2, log_every=5, ckpt_every=5, device="cpu", **train)
    return ForwardFlow(cfg), forward_step(cfg), tcfg


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


def test_training_writes_a_checkpoint_that_rebuilds_the_model(tmp_path):
    flow, step, tcfg = tiny_setup(10)
    trainer = fit(flow, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    ckpt = read_checkpoint(tmp_path / "f.pt")
    assert ckpt["step"] == 10 and ckpt["kind"] == "forward"
    rebuilt = load_checkpoint(tmp_path / "f.pt", ema=False)
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(rebuilt(x, torch.tensor([0, 1, 0]))[0], trainer.model.eval()(x, torch.tensor([0, 1, 0]))[0])
    assert {"loss", "nll_noisy_bpd", "grad_norm", "lr", "images_per_s", "state_rms/0"} <= set(trainer.metrics)


def test_a_rerun_resumes_from_the_checkpoint_and_finishes_the_remaining_steps(tmp_path):
    flow, step, tcfg = tiny_setup(10)
    fit(flow, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    starts = []

    def counting(start):
        starts.append(start)
        return toy_batches(start)

    flow2, _, tcfg2 = tiny_setup(20)
    trainer = fit(flow2, step, counting, tcfg2, tmp_path / "f.pt", progress=False)
    assert starts == [10] and trainer.step == 20
    assert trainer.opt.state_dict()["state"][0]["step"].item() == 20  # optimiser moments were restored
    again = fit(ForwardFlow(flow2.cfg), step, counting, tcfg2, tmp_path / "f.pt", progress=False)
    assert starts == [10] and again.step == 20  # finished: nothing left to do


def test_resuming_with_another_architecture_is_refused(tmp_path):
    flow, step, tcfg = tiny_setup(5)
    fit(flow, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    other = ForwardFlow(flow.cfg.model_copy(update={"width": 16, "heads": 2}))
    with pytest.raises(CheckpointError, match="another architecture"):
        fit(other, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    flow, step, tcfg = tiny_setup(20)
    calls = {"n": 0}

    def poisoned(model, x, y):
        calls["n"] += 1
        out = step(model, x, y)
        return {**out, "loss": out["loss"] * float("nan")} if calls["n"] > 7 else out

    with pytest.raises(TrainingDiverged, match="loss is nan at step 7"):
        fit(flow, poisoned, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    assert read_checkpoint(tmp_path / "f.pt")["step"] == 5


def test_corrupt_or_foreign_checkpoints_are_one_line_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable biflow checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a biflow checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    flow, step, tcfg = tiny_setup(5)
    fit(flow, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    blob = (tmp_path / "f.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "cut.pt")


def test_checkpoint_weights_that_do_not_fit_the_recorded_architecture_are_refused(tmp_path):
    flow, step, tcfg = tiny_setup(5)
    fit(flow, step, toy_batches, tcfg, tmp_path / "f.pt", progress=False)
    ckpt = read_checkpoint(tmp_path / "f.pt")
    ckpt["config"]["width"] = 16
    ckpt["config"]["heads"] = 2
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="do not match the model architecture"):
        load_checkpoint(tmp_path / "edited.pt")
