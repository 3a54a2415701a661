"""The steps of a BiFlow experiment and what each declares: inputs, config sections, resources (the code a step
runs is derived from its run function's imports: biflow/pipeline/codeset.py).

    prepare        dataset -> Parquet shards (train/, test/)
    latent         (only with pipeline.latent) images -> VAE latent shards, Ray Data batch inference
    train_forward  stage 1: the forward flow F by maximum likelihood (in-process or Ray Train)
    train_reverse  stage 2: the 1-NFE reverse model G against the frozen F; registered in MLflow
    evaluate       FD/FID, IS, class accuracy, ms/image and NFE per sampler (one parallel Ray task each)
    report         report.json, report.md and the FID-vs-ms/image plot

The evaluate and report steps live in biflow/pipeline/evaluation.py. A step function takes a `StepContext`
(biflow/pipeline/context.py) and writes its outputs into `ctx.out` (staging; published
with the done record by the runner) and returns a JSON-able summary, which the record keeps: later
steps and `biflow status` read it instead of the files.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biflow.pipeline.cache import link_or_copy
from biflow.pipeline.context import StepContext, data_dir, ray_running, training_data
from biflow.pipeline.evaluation import run_evaluate, run_report
from biflow.pipeline.forward_source import import_forward, source_identity
from biflow.pipeline.spec import PipelineConfig

# Fields that change how a step is executed, not what it computes (kept out of step keys), per section.
_TRAIN_EXECUTION = ("log_every", "ckpt_every", "num_workers")
EXECUTION_ONLY = {"data": ("workers",), "train_forward": _TRAIN_EXECUTION, "train_reverse": _TRAIN_EXECUTION,
                  "pipeline.latent": ("batch_size", "use_gpu", "workers", "cpus", "local_files_only")}


@dataclass(frozen=True)
class StepDef:
    name: str
    inputs: tuple[str, ...]  # upstream steps
    sections: tuple[str, ...]  # config sections (dotted) in this step's key and in its child run's params
    run: Callable[[StepContext], dict[str, Any]]
    resources: Callable[[PipelineConfig], dict[str, Any]]  # Ray task options
    identity: Callable[[PipelineConfig], Any] | None = None  # what else its result depends on (e.g. the source data)
    enabled: Callable[[PipelineConfig], bool] | None = None  # None: always part of the DAG

    def active(self, cfg: PipelineConfig) -> bool:
        return self.enabled is None or self.enabled(cfg)

    def config(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The resolved settings this step's result depends on (execution-only fields removed)."""
        out: dict[str, Any] = {}
        for section in self.sections:
            node: Any = cfg
            for part in section.split("."):
                node = getattr(node, part)
            data = node.model_dump() if node is not None else None
            if data is not None and section in EXECUTION_ONLY:
                data = {k: v for k, v in data.items() if k not in EXECUTION_ONLY[section]}
            out[section] = data
        identity = self.identity(cfg) if self.identity is not None else None
        if identity is not None:  # None: nothing beyond the sections (e.g. no imported stage 1)
            out["identity"] = identity
        return out


def _data_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What the prepared shards are made of: the builder recipe (with the image tree's fingerprint), or user shards' hashes."""
    from biflow.data import read_manifest
    from biflow.data.builtin import SPLITS, data_recipe

    if cfg.data.name == "shards":
        return {split: read_manifest(Path(cfg.data.source).expanduser() / split)["content_hash"] for split in SPLITS}
    return data_recipe(cfg.data)


def _vae_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The VAE's files (path, size, mtime: a replaced checkpoint re-encodes), or the hub id as given."""
    from biflow.data.imagefolder import tree_fingerprint

    path = Path(cfg.pipeline.latent.vae).expanduser()
    return {"vae_files": tree_fingerprint(path) if path.is_dir() else None}


def _training_resources(section: str) -> Callable[[PipelineConfig], dict[str, Any]]:
    """A TorchTrainer's driver task needs no CPU (its workers reserve theirs); in-process training reserves `cpus`."""

    def options(cfg: PipelineConfig) -> dict[str, Any]:
        scaling = getattr(cfg.pipeline, section)
        if getattr(cfg, section).num_workers > 0:
            return {"num_cpus": 0}
        return {"num_cpus": scaling.cpus, "num_gpus": 1 if scaling.use_gpu else 0}

    return options


# ----------------------------------------------------------------------- prepare
def run_prepare(ctx: StepContext) -> dict[str, Any]:
    from biflow.data import prepare, read_manifest

    cfg = ctx.cfg.data
    root = prepare(cfg, ctx.out / "data")  # data.name=shards: the user's shards, validated and used in place
    rel = str(Path(root).resolve()) if cfg.name == "shards" else "data"
    splits = {}
    for split in ("train", "test"):
        m = read_manifest(Path(root) / split)
        splits[split] = {"count": m["count"], "content_hash": m["content_hash"]}
    meta = read_manifest(Path(root) / "train")["meta"]
    metrics = {"data/train_images": splits["train"]["count"], "data/test_images": splits["test"]["count"],
               "data/num_classes": meta["num_classes"]}
    if ctx.run is not None:
        ctx.run.log_metrics(metrics)
    ctx.log(f"{cfg.name}: {splits['train']['count']} train / {splits['test']['count']} test images of shape "
            f"{tuple(meta['image_shape'])}, {meta['num_classes']} classes")
    return {"data_dir": rel, "splits": splits, "meta": {k: meta[k] for k in ("name", "image_shape", "num_classes", "class_names")},
            "metrics": metrics}


# ------------------------------------------------------------------------ latent
def run_latent(ctx: StepContext) -> dict[str, Any]:
    from biflow.latent import encode_shards, read_latent_manifest

    lc = ctx.cfg.pipeline.latent
    staged = ctx.work / "latents"  # survives a crashed attempt: splits already encoded are not encoded again
    where = f"Ray Data, {lc.workers} actor(s)" if ray_running() else "in-process"
    ctx.log(f"encoding images with the VAE {lc.vae} ({where}{', GPU' if lc.use_gpu else ''})")
    t0 = time.perf_counter()
    encode_shards(data_dir(ctx), staged, lc.codec(), lc.batch_size, lc.use_gpu, use_ray=ray_running(), workers=lc.workers,
                  num_cpus=lc.cpus, rows_per_shard=lc.rows_per_shard)
    root = staged.rename(ctx.out / "latents")
    manifests = {split: read_latent_manifest(root / split) for split in ("train", "test")}
    meta = manifests["train"]["meta"]
    images = sum(m["count"] for m in manifests.values())
    stats = meta["stats"]
    metrics = {"latent/images_per_s": images / max(time.perf_counter() - t0, 1e-9),
               **{f"latent/channel{c}_mean": v for c, v in enumerate(stats["mean"])},
               **{f"latent/channel{c}_std": v for c, v in enumerate(stats["std"])}}
    if ctx.run is not None:
        ctx.run.log_metrics(metrics)
    ctx.log(f"{images} images -> latents {tuple(meta['latent_shape'])} ({meta['dtype']}); train latent std per channel "
            f"{', '.join(f'{v:.3f}' for v in stats['std'])} (scaling factor {meta['codec']['scaling_factor']:g})")
    keep = ("name", "image_shape", "num_classes", "class_names", "latent_shape", "source_image_shape", "dtype")
    return {"data_dir": "latents", "meta": {k: meta[k] for k in keep}, "codec": meta["codec"], "metrics": metrics,
            "splits": {s: {"count": m["count"], "content_hash": m["content_hash"]} for s, m in manifests.items()}}


# --------------------------------------------------------------------- training
def _stage_job(ctx: StepContext, kind: str, **extra):
    from biflow.config import ExperimentConfig
    from biflow.pipeline.raytrain import StageJob

    cfg = ExperimentConfig.model_validate(ctx.cfg.model_dump(exclude={"pipeline"}))
    return StageJob(kind=kind, cfg=cfg, data=training_data(ctx), work_dir=str(ctx.work),
                    run=ctx.run.ref if ctx.run is not None else None, **extra)


def _train(ctx: StepContext, job) -> tuple[Path, dict[str, Any]]:
    from biflow.pipeline.raytrain import train_stage

    section = f"train_{job.kind}"
    workers = job.train.num_workers
    ctx.log(f"training {'in-process' if workers == 0 else f'on Ray Train with {workers} workers'}")
    ckpt, summary = train_stage(job, workers, getattr(ctx.cfg.pipeline, section), ctx.storage.uri("_work", ctx.name, ctx.key),
                                f"{ctx.name}-{ctx.key}")
    out = link_or_copy(ckpt, ctx.out / job.ckpt_name)
    if ctx.run is not None:
        ctx.run.log_artifact(out, "checkpoints")
    return out, summary


def run_train_forward(ctx: StepContext) -> dict[str, Any]:
    from biflow.checkpoint import load_checkpoint
    from biflow.training.forward import evaluate_bpd, evaluate_noisy_bpd

    job = _stage_job(ctx, "forward")
    ckpt, summary = import_forward(ctx, job) if ctx.cfg.pipeline.forward_checkpoint else _train(ctx, job)
    flow = load_checkpoint(ckpt)
    x, y = job.data.tensors("test")  # bits/dim per model dimension: of pixels, or of VAE latents
    y = y if flow.cfg.num_classes else None
    # test/bits_per_dim: the standard number (uniformly dequantised 8-bit pixels; none for continuous VAE latents);
    # test/nll_noisy_bpd: on the Gaussian-noised data the flow is trained on
    bpd = None if job.data.latent else evaluate_bpd(flow, x, y)
    metrics = {"test/bits_per_dim": bpd, "test/nll_noisy_bpd": evaluate_noisy_bpd(flow, x, y, pixels=not job.data.latent),
               "train/steps": summary["steps"], "train/resumed_from_step": summary["resumed_from_step"]}
    if ctx.run is not None:
        ctx.run.log_metrics(metrics, step=summary["steps"])  # None (latent bits/dim) is dropped
    ctx.log(f"{summary['steps']} steps, test bits/dim {'n/a' if bpd is None else f'{bpd:.4f}'} (uniform dequantisation), "
            f"{metrics['test/nll_noisy_bpd']:.4f} on noised data")
    return {"checkpoint": ckpt.name, "training": summary, "metrics": metrics,
            "params": sum(p.numel() for p in flow.parameters()),
            "latent_shape": job.data.meta["latent_shape"] if job.data.latent else None}


def run_train_reverse(ctx: StepContext) -> dict[str, Any]:
    from biflow.checkpoint import load_checkpoint

    fwd = ctx.inputs["train_forward"]
    job = _stage_job(ctx, "reverse", forward_ckpt=str(ctx.input_dir("train_forward") / fwd["result"]["checkpoint"]),
                     forward_ckpt_uri=ctx.input_uri("train_forward", fwd["result"]["checkpoint"]))
    ckpt, summary = _train(ctx, job)
    reverse = load_checkpoint(ckpt)
    metrics = {"train/steps": summary["steps"], "train/resumed_from_step": summary["resumed_from_step"],
               **{f"train/final/{k}": v for k, v in summary["final"].items() if "/" not in k}}
    registered = None
    if ctx.run is not None:
        ctx.run.log_metrics(metrics, step=summary["steps"])
        name = ctx.cfg.pipeline.register_model
        if name:
            registered = {"name": name, "version": ctx.run.register_pytorch(reverse, name)}
            ctx.log(f"registered {name} version {registered['version']} in the MLflow model registry")
    ctx.log(f"{summary['steps']} steps, final loss {summary['final'].get('loss', float('nan')):.4f}")
    return {"checkpoint": ckpt.name, "training": summary, "metrics": metrics, "registered_model": registered,
            "params": sum(p.numel() for p in reverse.parameters())}


# ------------------------------------------------------------------------- DAG
# Each step's code version covers the sources its run function imports (biflow/pipeline/codeset.py).
STEPS: dict[str, StepDef] = {s.name: s for s in (
    StepDef("prepare", (), ("data",), run_prepare, lambda cfg: {"num_cpus": 1}, _data_identity),
    # Ray Data's read tasks and encoding actors reserve their own CPUs/GPUs: the driving task takes none.
    StepDef("latent", ("prepare",), ("pipeline.latent",), run_latent, lambda cfg: {"num_cpus": 0}, _vae_identity,
            enabled=lambda cfg: cfg.pipeline.latent is not None),
    StepDef("train_forward", ("prepare", "latent"), ("forward", "train_forward"), run_train_forward,
            _training_resources("train_forward"), source_identity),  # pipeline.forward_checkpoint: imported, not trained
    StepDef("train_reverse", ("prepare", "latent", "train_forward"), ("reverse", "reverse_loss", "train_reverse"),
            run_train_reverse, _training_resources("train_reverse")),
    StepDef("evaluate", ("prepare", "train_forward", "train_reverse"), ("pipeline.evaluate",), run_evaluate,
            lambda cfg: {"num_cpus": cfg.pipeline.evaluate.cpus, "num_gpus": cfg.pipeline.evaluate.gpus}),
    StepDef("report", ("train_forward", "train_reverse", "evaluate"), (), run_report, lambda cfg: {"num_cpus": 1}),
)}
ORDER = tuple(STEPS)  # a topological order


def active_steps(cfg: PipelineConfig) -> tuple[str, ...]:
    """The steps of this pipeline, in ORDER (`latent` only with pipeline.latent)."""
    return tuple(name for name in ORDER if STEPS[name].active(cfg))


def downstream(names: set[str]) -> set[str]:
    """`names` and every step that depends on them, directly or not."""
    out = set(names)
    for name in ORDER:
        if out & set(STEPS[name].inputs):
            out.add(name)
    return out
