"""Stage 1 and stage 2 training inside a pipeline step: in-process, or data-parallel on Ray Train.

The stage itself (model, step function, checkpoint record) is built by biflow.training.stages, the data read
through biflow.data.model_space; this module is the Ray glue. One `StageJob` describes the work; `train_stage` runs it

    num_workers == 0   in the step's own process: `fit` on batches from the shards (tests, laptops);
    num_workers >= 1   a `TorchTrainer` with `ScalingConfig(num_workers, use_gpu, resources_per_worker)`,
                       DDP (gloo on CPU, NCCL on GPU), data from the Parquet shards through Ray Data
                       (`read_parquet` in the step, `get_dataset_shard` in each worker), checkpoints
                       reported by every rank (rank 0 attaches the file), `FailureConfig(max_failures)`.

Either way the per-rank work is the same `fit` loop, and the run resumes from the last checkpoint:
in-process from `<work>/<stage>.pt`; on Ray Train from the run's storage, because the run name is
derived from the step key (never a timestamp) and a rerun with the same name continues it.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from biflow.config import ExperimentConfig, TrainConfig
from biflow.data.model_space import TrainingData
from biflow.device import resolve_device
from biflow.errors import UserError
from biflow.pipeline.cache import link_or_copy
from biflow.pipeline.spec import ScalingSection
from biflow.pipeline.tracking import RunRef, StepRun
from biflow.training.loop import fit
from biflow.training.stages import Kind, Stage, build_stage, train_in_memory


@dataclass(frozen=True)
class StageJob:
    """Everything a (remote) worker needs to train one stage; picklable, validated once when built."""

    kind: Kind
    cfg: ExperimentConfig  # the experiment (the pipeline section is not needed)
    data: TrainingData  # the training data in model space (pixels or latents), local to the step
    work_dir: str  # local resumable state of the step (in-process checkpoint)
    forward_ckpt: str | None = None  # reverse: the trained forward flow, local to the step
    forward_ckpt_uri: str | None = None  # ... and in storage, for workers on other machines
    run: RunRef | None = None  # the step's MLflow child run (rank 0 logs curves into it)

    @property
    def ckpt_name(self) -> str:
        return f"{self.kind}.pt"

    @property
    def train(self) -> TrainConfig:
        return self.cfg.train_forward if self.kind == "forward" else self.cfg.train_reverse


def stage_for(job: StageJob, device: torch.device) -> Stage:
    """`build_stage` with what only this process can provide: the forward flow as a local file (downloaded on
    a node that lacks it) and, for a perceptual loss on latents, the frozen VAE decoder."""
    forward = local_input(job.forward_ckpt, job.forward_ckpt_uri) if job.kind == "reverse" else None
    decoder = None
    if job.kind == "reverse" and job.data.latent and job.cfg.reverse_loss.perceptual_list():
        from biflow.latent import LatentCodec

        decoder = LatentCodec.load(job.data.codec, device).decode
    return build_stage(job.kind, job.cfg, job.data, forward, device, decoder)


def local_input(path: str, uri: str | None) -> str:
    """`path` if this machine has it, else a download of `uri` (a worker on another node of the cluster)."""
    if Path(path).is_file() or not uri or uri == path:
        return path
    import pyarrow.fs

    fs, remote = pyarrow.fs.FileSystem.from_uri(uri)
    local = Path(tempfile.mkdtemp(prefix="biflow-input-")) / Path(remote).name
    with fs.open_input_stream(remote) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    return str(local)


def _log_fn(run: StepRun | None, label: str) -> Callable[[int, dict[str, float]], None]:
    """Console line + MLflow batch per log interval (metric names: train/<term>)."""

    def on_log(step: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
        print(f"[{label}] step {step}: {shown}", flush=True)
        if run is not None:
            run.log_metrics(metrics, step, prefix="train/")

    return on_log


# ------------------------------------------------------------------ in-process
def train_in_process(job: StageJob, threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    stage = stage_for(job, resolve_device(job.train.device, f"train_{job.kind}.device"))
    ckpt = Path(job.work_dir) / job.ckpt_name
    resumed_from = _checkpoint_step(ckpt)
    run = StepRun(job.run) if job.run else None
    trainer = train_in_memory(stage, job.data, ckpt, on_log=_log_fn(run, job.kind))
    return ckpt, {"steps": trainer.step, "resumed_from_step": resumed_from, "workers": 0, "final": dict(trainer.metrics)}


def _checkpoint_step(path: Path) -> int:
    if not path.is_file():
        return 0
    from biflow.checkpoint import read_checkpoint

    return int(read_checkpoint(path)["step"])


# ------------------------------------------------------------------- Ray Train
def shard_batches(shard, batch_size: int, decode: Callable, seed: int) -> Callable[[int], Iterator]:
    """start step -> endless decode(rows) = (x float32 (B, C, H, W), y int64 (B,)) from a Ray Data shard."""

    def gen(start: int):
        epoch = 0
        while True:
            got = 0
            for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=max(4 * batch_size, 1024),
                                        local_shuffle_seed=seed + start + epoch):
                got += 1
                yield decode(b)
            if not got:
                raise UserError(f"a data shard holds fewer rows than one per-worker batch ({batch_size}); "
                                "lower the batch size or the number of workers")
            epoch += 1

    return gen


def _quiet_ray_train() -> None:
    """Ray Train logs every report with all its metrics at INFO; our own log line per interval is enough."""
    import importlib
    import logging

    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            logging.getLogger(importlib.import_module(name).__file__).setLevel(logging.WARNING)
        except Exception:  # noqa: BLE001 - private modules; losing the quieting is harmless
            pass


class Reports:
    """What each checkpoint report of a Ray Train run carries: the step, where it resumed, the training metrics.

    Picklable; every worker gets a copy. A caller that needs more (a sweep trial's validation metrics, which
    Ray Tune schedules on) subclasses it: `start` runs once per worker before training, `extra` on rank 0 at
    each checkpoint.
    """

    checkpoint_every_log = False  # True: one checkpoint (and report) per log interval instead of per ckpt_every

    def start(self, job: StageJob, device: torch.device, rank: int) -> None:
        pass

    def metrics(self, step: int, metrics: dict[str, float], resumed_from: int) -> dict[str, float]:
        return {"step": step, "resumed_from_step": resumed_from, **metrics}

    def extra(self, checkpoint: Path) -> dict[str, float]:
        return {}


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, wrap in DDP, fit on this rank's data shard, report checkpoints."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    job: StageJob = config["job"]
    reports: Reports = config.get("reports") or Reports()
    _quiet_ray_train()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    local = Path(tempfile.mkdtemp(prefix=f"biflow-{job.kind}-rank{rank}-"))
    ckpt = local / job.ckpt_name
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copyfile(Path(d) / job.ckpt_name, ckpt)
    elif (Path(job.work_dir) / job.ckpt_name).is_file():  # an in-process attempt of the same step got this far
        shutil.copyfile(Path(job.work_dir) / job.ckpt_name, ckpt)
    resumed_from = _checkpoint_step(ckpt)

    tcfg = job.train
    if tcfg.batch_size % world:
        raise UserError(f"batch_size {tcfg.batch_size} is not divisible by num_workers {world}")
    # Rank r draws its own noise and label dropout (seed + r); rank 0 keeps the configured seed.
    tcfg = tcfg.model_copy(update={"device": str(device), "seed": tcfg.seed + rank})
    if reports.checkpoint_every_log:
        tcfg = tcfg.model_copy(update={"ckpt_every": tcfg.log_every})
    stage = stage_for(job, device)
    model = stage.model.to(device)
    unused = job.kind == "reverse" and job.cfg.reverse_loss.strategy == "naive_distillation"  # heads get no gradient
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=unused)
    run = StepRun(job.run) if job.run is not None and rank == 0 else None
    if run is not None and resumed_from:
        run.log_metrics({"resumed_from_step": resumed_from}, resumed_from, prefix="train/")
    batches = shard_batches(ray.train.get_dataset_shard("train"), tcfg.batch_size // world, job.data.decode_rows,
                            tcfg.seed * 1000 + rank)
    reports.start(job, device, rank)

    def on_checkpoint(path: Path, step: int, metrics: dict[str, float]) -> None:
        report = reports.metrics(step, metrics, resumed_from)
        if rank == 0:  # every rank reports (a barrier); rank 0 adds its extras and attaches the file
            report.update(reports.extra(path))
            with tempfile.TemporaryDirectory() as d:
                link_or_copy(path, Path(d) / job.ckpt_name)
                checkpoint = Checkpoint.from_directory(d)
                checkpoint.set_metadata({"step": step})
                ray.train.report(report, checkpoint=checkpoint)
        else:
            ray.train.report(report)

    fit(ddp, stage.step, batches, tcfg, ckpt, meta=stage.meta, on_log=_log_fn(run, f"{job.kind} rank 0") if rank == 0 else None,
        desc=stage.desc, progress=False, is_main=rank == 0, on_checkpoint=on_checkpoint)
    if run is not None:
        run.flush()
    shutil.rmtree(local, ignore_errors=True)


def _materialize_needed(num_workers: int, scaling: ScalingSection) -> bool:
    """Ray Data needs a free CPU to read; when the training workers take every CPU, read everything first."""
    import ray

    per_worker = scaling.resources_per_worker.get("CPU", 1)  # Ray Train's default is one CPU per worker
    return ray.cluster_resources().get("CPU", 0) - num_workers * per_worker < 1


def train_on_ray(job: StageJob, num_workers: int, scaling: ScalingSection, storage_path: str, name: str,
                 dest: Path, reports: Reports | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Fit a TorchTrainer (resuming run `name` under `storage_path`); the final checkpoint is copied to `dest`.

    reports: what each checkpoint report carries (default: `Reports()`); callbacks: Ray Train run callbacks
    (a sweep trial passes Tune's TuneReportCallback)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(job.data.uri).select_columns([job.data.column, "label"])
    if _materialize_needed(num_workers, scaling):
        ds = ds.materialize()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job, "reports": reports},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=dict(scaling.resources_per_worker) or None),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=scaling.num_to_keep),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             callbacks=list(callbacks) or None),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise UserError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        link_or_copy(Path(d) / job.ckpt_name, dest)
    metrics = dict(result.metrics or {})
    return {"steps": int(metrics.get("step", _checkpoint_step(dest))), "resumed_from_step": int(metrics.get("resumed_from_step", 0)),
            "workers": num_workers, "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def train_stage(job: StageJob, num_workers: int, scaling: ScalingSection, ray_storage: str, name: str) -> tuple[Path, dict]:
    """Train one stage; returns (final checkpoint under job.work_dir, summary)."""
    if num_workers == 0:
        return train_in_process(job, threads=int(scaling.cpus))
    dest = Path(job.work_dir) / job.ckpt_name
    return dest, train_on_ray(job, num_workers, scaling, ray_storage, name, dest)
