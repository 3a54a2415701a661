"""Shared fixtures: small, deterministic, non-trivial forward flows; one torch thread; one local Ray per module."""
from __future__ import annotations

import os

import pytest
import torch

from biflow.models.forward_flow import ForwardFlow


def randomize_flow(flow: ForwardFlow, std: float = 0.2, seed: int = 0) -> ForwardFlow:
    """Give every block a random (non-zero) output projection, so the flow is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in flow.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=gen) * std)
            block.proj_out.bias.copy_(torch.randn(block.proj_out.bias.shape, generator=gen) * std)
    return flow


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny models: intra-op threading only adds overhead (and contention on
    shared CI). Use with `pytestmark = pytest.mark.usefixtures("single_thread")`; the count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module of pipeline tests (no dashboard: nothing needs the state API); the pipelines use
    their own default MLflow store under the test's storage, so MLFLOW_TRACKING_URI is unset meanwhile."""
    import ray

    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    if ray.is_initialized():  # left over by another module: start ours with the settings below
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield
    ray.shutdown()
    if saved_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


@pytest.fixture
def make_flow():
    """Factory for a random non-trivial tiny flow: make_flow(dtype=..., randomize=True, **ForwardConfig fields)."""

    def build(dtype: torch.dtype = torch.float32, randomize: bool = True, std: float = 0.2, seed: int = 0, **overrides):
        kw = dict(image_size=4, patch_size=2, in_channels=1, num_classes=3)
        kw.update(overrides)
        torch.manual_seed(seed)
        flow = ForwardFlow("tiny", **kw)
        if randomize:
            randomize_flow(flow, std=std, seed=seed)
        return flow.to(dtype).eval()

    return build


@pytest.fixture
def tiny_flow(make_flow) -> ForwardFlow:
    """A random non-trivial tiny flow in float32: 1 channel, 4x4 image, 2x2 patches, 3 classes."""
    return make_flow()


# ------------------------------------------------------------- trained digits models (once per session)
DIGITS_STEPS = {"forward": 600, "reverse": 400}  # a few minutes of CI time: class accuracy 0.94 exact, 0.72 1-NFE


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory):
    """Both BiFlow stages trained once on the built-in digits: paths, models and the data splits."""
    import hashlib
    from types import SimpleNamespace

    from biflow.checkpoint import load_checkpoint
    from biflow.config import ExperimentConfig, validate
    from biflow.data import load_split, prepare
    from biflow.training.stages import train_stage_into

    out = tmp_path_factory.mktemp("digits_run")
    cfg = validate(ExperimentConfig, {"train_forward": {"steps": DIGITS_STEPS["forward"], "log_every": 300},
                                      "train_reverse": {"steps": DIGITS_STEPS["reverse"], "log_every": 300}})
    fwd, fwd_ckpt = train_stage_into("forward", cfg, out, prepare(cfg.data, out / "data"), progress=False)
    forward_sha = hashlib.sha256(fwd_ckpt.read_bytes()).hexdigest()
    rev, rev_ckpt = train_stage_into("reverse", cfg, out, fwd.meta["data_dir"], fwd_ckpt, progress=False)
    data_dir = fwd.meta["data_dir"]
    return SimpleNamespace(
        out=out, cfg=cfg, forward_ckpt=fwd_ckpt, reverse_ckpt=rev_ckpt, forward_sha=forward_sha,
        flow=load_checkpoint(fwd_ckpt), reverse=load_checkpoint(rev_ckpt), data_dir=data_dir,
        train=load_split(data_dir, "train"), test=load_split(data_dir, "test"),
        forward_metrics=fwd.metrics, reverse_metrics=rev.metrics,
    )


@pytest.fixture(scope="session")
def digits_evaluator(digits_models, tmp_path_factory):
    """The digits classifier of biflow.metrics, trained on the training split (cached per session)."""
    from biflow.metrics.evaluator import load_or_train_evaluator

    train = digits_models.train
    return load_or_train_evaluator(train.images, train.labels, content_hash=train.content_hash,
                                   cache_dir=tmp_path_factory.mktemp("evaluator_cache"))
