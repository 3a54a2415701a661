"""What a step function receives (`StepContext`) and the helpers steps share to find their inputs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biflow.atomic import atomic_write_bytes
from biflow.data.model_space import TrainingData
from biflow.pipeline.cache import Storage
from biflow.pipeline.spec import PipelineConfig
from biflow.pipeline.tracking import StepRun


@dataclass
class StepContext:
    name: str
    key: str
    cfg: PipelineConfig
    storage: Storage
    inputs: dict[str, dict[str, Any]]  # upstream step -> its done record
    run: StepRun | None  # this step's MLflow child run
    work: Path  # resumable state (checkpoints); survives a crash, dropped once the step is done
    out: Path  # staging directory of the outputs

    def input_dir(self, step: str) -> Path:
        return self.storage.fetch(step, self.inputs[step]["key"])

    def input_uri(self, step: str, *parts: str) -> str:
        return self.storage.uri(step, self.inputs[step]["key"], *parts)

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def data_dir(ctx: StepContext, step: str = "prepare") -> Path:
    """The data root (train/, test/) of `prepare` (images) or `latent` (VAE latents), local to this step."""
    rec = ctx.inputs[step]["result"]
    d = Path(rec["data_dir"])
    return d if d.is_absolute() else ctx.input_dir(step) / d


def _train_uri(ctx: StepContext, step: str) -> str:
    """The train shards as Ray Data reads them: the local path, or straight from object storage (a URI)."""
    rec = ctx.inputs[step]["result"]
    if ctx.storage.is_local or Path(rec["data_dir"]).is_absolute():
        return str(data_dir(ctx, step) / "train")
    return ctx.input_uri(step, rec["data_dir"], "train")


def training_data(ctx: StepContext) -> TrainingData:
    """What both stages train on: the `latent` step's VAE latents when the pipeline has one, else `prepare`'s images."""
    src = "latent" if "latent" in ctx.inputs else "prepare"
    rec = ctx.inputs[src]["result"]
    latent: dict[str, Any] = {}
    if src == "latent":  # checkpoints record the VAE (to decode samples) and the images behind the latents
        latent = dict(codec=ctx.cfg.pipeline.latent.codec().model_dump(), image_dir=str(data_dir(ctx)),
                      image_hash=ctx.inputs["prepare"]["result"]["splits"]["train"]["content_hash"])
    return TrainingData(root=str(data_dir(ctx, src)), meta=rec["meta"], content_hash=rec["splits"]["train"]["content_hash"],
                        train_uri=_train_uri(ctx, src), **latent)


def ray_running() -> bool:
    import ray

    return ray.is_initialized()
