"""The five steps of a BiFlow experiment and what each declares: inputs, config, code, resources.

    prepare        dataset -> Parquet shards (train/, test/)
    latent         (only with pipeline.latent) images -> VAE latent shards, Ray Data batch inference
    train_forward  stage 1: the forward flow F by maximum likelihood (in-process or Ray Train)
    train_reverse  stage 2: the 1-NFE reverse model G against the frozen F; registered in MLflow
    evaluate       FD/FID, IS, class accuracy, ms/image and NFE per sampler (one parallel Ray task each)
    report         report.json, report.md and the FID-vs-ms/image plot

A step function takes a `StepContext` and writes its outputs into `ctx.out` (staging; published
with the done record by the runner) and returns a JSON-able summary, which the record keeps: later
steps and `biflow status` read it instead of the files.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from biflow.atomic import atomic_write_bytes
from biflow.config import flatten
from biflow.pipeline.cache import Storage, link_or_copy
from biflow.pipeline.spec import PipelineConfig
from biflow.pipeline.tracking import StepRun

# Fields that change how a step is executed, not what it computes (kept out of step keys), per section.
_TRAIN_EXECUTION = ("log_every", "ckpt_every", "num_workers")
EXECUTION_ONLY = {"data": ("workers",), "train_forward": _TRAIN_EXECUTION, "train_reverse": _TRAIN_EXECUTION,
                  "pipeline.latent": ("batch_size", "use_gpu", "workers", "cpus", "local_files_only")}


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


@dataclass(frozen=True)
class StepDef:
    name: str
    inputs: tuple[str, ...]  # upstream steps
    sections: tuple[str, ...]  # config sections (dotted) in this step's key and in its child run's params
    code: tuple[str, ...]  # package-relative sources its result depends on (the code version)
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
        if self.identity is not None:
            out["identity"] = self.identity(cfg)
        return out


def _data_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What the prepared shards are made of: the builder recipe (with the image tree's fingerprint), or user shards' hashes."""
    from biflow.data import read_manifest
    from biflow.data.builtin import SPLITS, _recipe

    if cfg.data.name == "shards":
        return {split: read_manifest(Path(cfg.data.source).expanduser() / split)["content_hash"] for split in SPLITS}
    return _recipe(cfg.data)


def _vae_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The VAE's files (path, size, mtime: a replaced checkpoint re-encodes), or the hub id as given."""
    from biflow.data.builtin import _tree_fingerprint

    path = Path(cfg.pipeline.latent.vae).expanduser()
    return {"vae_files": _tree_fingerprint(path) if path.is_dir() else None}


def _training_resources(section: str) -> Callable[[PipelineConfig], dict[str, Any]]:
    """A TorchTrainer's driver task needs no CPU (its workers reserve theirs); in-process training reserves `cpus`."""

    def options(cfg: PipelineConfig) -> dict[str, Any]:
        scaling = getattr(cfg.pipeline, section)
        if getattr(cfg, section).num_workers > 0:
            return {"num_cpus": 0}
        return {"num_cpus": scaling.cpus, "num_gpus": 1 if scaling.use_gpu else 0}

    return options


# ------------------------------------------------------------------------ helpers
def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def data_dir(ctx: StepContext, step: str = "prepare") -> Path:
    """The data root (train/, test/) of `prepare` (images) or `latent` (VAE latents), local to this step."""
    rec = ctx.inputs[step]["result"]
    d = Path(rec["data_dir"])
    return d if d.is_absolute() else ctx.input_dir(step) / d


def train_uri(ctx: StepContext, step: str = "prepare") -> str:
    """The train shards as Ray Data reads them: the local path, or straight from object storage (a URI)."""
    rec = ctx.inputs[step]["result"]
    if ctx.storage.is_local or Path(rec["data_dir"]).is_absolute():
        return str(data_dir(ctx, step) / "train")
    return ctx.input_uri(step, rec["data_dir"], "train")


def training_data(ctx: StepContext) -> str:
    """The step whose shards the flows train on: `latent` when the pipeline has a VAE, else `prepare`."""
    return "latent" if "latent" in ctx.inputs else "prepare"


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
    from biflow.pipeline.raytrain import StageJob

    src = training_data(ctx)
    rec = ctx.inputs[src]["result"]
    latent = None
    if src == "latent":  # the checkpoints record the VAE (to decode samples) and the images behind the latents
        latent = {"codec": ctx.cfg.pipeline.latent.codec().model_dump(), "image_dir": str(data_dir(ctx)),
                  "image_hash": ctx.inputs["prepare"]["result"]["splits"]["train"]["content_hash"]}
    return StageJob(kind=kind, config=ctx.cfg.model_dump(exclude={"pipeline"}), data_dir=str(data_dir(ctx, src)),
                    train_uri=train_uri(ctx, src), data_meta=rec["meta"], data_hash=rec["splits"]["train"]["content_hash"],
                    work_dir=str(ctx.work), run=ctx.run.ref if ctx.run is not None else None, latent=latent, **extra)


def _train(ctx: StepContext, job) -> tuple[Path, dict[str, Any]]:
    from biflow.pipeline.raytrain import train_stage

    section = f"train_{job.kind}"
    workers = getattr(ctx.cfg, section).num_workers
    ctx.log(f"training {'in-process' if workers == 0 else f'on Ray Train with {workers} workers'}")
    ckpt, summary = train_stage(job, workers, getattr(ctx.cfg.pipeline, section), ctx.storage.uri("_work", ctx.name, ctx.key),
                                f"{ctx.name}-{ctx.key}")
    out = link_or_copy(ckpt, ctx.out / job.ckpt_name)
    if ctx.run is not None:
        ctx.run.log_artifact(out, "checkpoints")
    return out, summary


def run_train_forward(ctx: StepContext) -> dict[str, Any]:
    from biflow.checkpoint import load_checkpoint
    from biflow.pipeline.raytrain import load_training_split
    from biflow.training.forward import evaluate_bpd

    job = _stage_job(ctx, "forward")
    ckpt, summary = _train(ctx, job)
    flow = load_checkpoint(ckpt)
    x, y = load_training_split(job, "test")  # bits/dim per model dimension: of pixels, or of VAE latents
    bpd = evaluate_bpd(flow, x, y if flow.cfg.num_classes else None, pixels=job.latent is None)
    metrics = {"test/bits_per_dim": bpd, "train/steps": summary["steps"], "train/resumed_from_step": summary["resumed_from_step"]}
    if ctx.run is not None:
        ctx.run.log_metrics(metrics, step=summary["steps"])
    ctx.log(f"{summary['steps']} steps, test bits/dim {bpd:.4f}")
    return {"checkpoint": ckpt.name, "training": summary, "metrics": metrics,
            "params": sum(p.numel() for p in flow.parameters()),
            "latent_shape": job.data_meta["latent_shape"] if job.latent is not None else None}


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


# ---------------------------------------------------------------------- evaluate
def metrics_cache(storage: Storage) -> Path:
    """Trained evaluators and reference statistics, shared by every run on this storage."""
    return (Path(storage.root) if storage.is_local else storage.local_dir) / "_shared" / "metrics"


def score_sampler(spec: dict[str, Any]) -> dict[str, Any]:
    """One sampler: draw samples, score them (FD/FID, IS, class accuracy), time it. Runs as its own Ray task."""
    import torch

    from biflow.checkpoint import read_checkpoint
    from biflow.commands.eval import build_sampler
    from biflow.data import load_split
    from biflow.metrics import Reference, evaluate_sampler, get_feature_net
    from biflow.metrics.evaluator import load_or_train_evaluator
    from biflow.training.loop import resolve_device

    c0 = time.process_time()
    torch.set_num_threads(max(1, int(spec["cpus"])))
    device = resolve_device(spec["device"])
    path = Path(spec["checkpoint"])
    ckpt = read_checkpoint(path)
    sample_fn, num_classes, nfe, details = build_sampler(path, ckpt, spec["sampler"], spec["guidance"], True,
                                                         spec["seed"], device)
    del ckpt
    reference = Reference.from_shardset(load_split(spec["data_dir"], "train"), "train")
    net = get_feature_net(spec["features"], inception_weights=spec["inception_weights"], reference=reference,
                          cache_dir=spec["cache_dir"], device=str(device))
    classifier = None
    if num_classes:
        classifier = net if spec["features"] == "evaluator" else load_or_train_evaluator(
            reference.images, reference.labels, content_hash=reference.content_hash, cache_dir=spec["cache_dir"], device=device)
    num = spec["num_samples"]
    res = evaluate_sampler(sample_fn, num, reference, net, spec["cache_dir"], num_classes=num_classes,
                           batch=spec["batch_size"], time_batch=min(spec["timing_batch"], num), repeats=spec["timing_repeats"],
                           warmup=1, device=device, classifier=classifier, decode=details["decode"], keep=spec["grid"])
    metric = net.metric_name  # the grid's labels are 0, 1, ..., K-1, 0, ...: its rows run through the classes
    return {"sampler": spec["sampler"], "metric_name": metric, metric: res[metric], "is": res["is"],
            "is_std": res["is_std"], "class_acc": res["class_acc"], "ms_per_image": res["ms_per_image"],
            "images_per_s": res["images_per_s"], "decode_ms_per_image": res["decode_ms_per_image"], "nfe": nfe,
            "timing": res["timing"], "denoise": details["denoise"], "num_samples": res["num_samples"],
            "num_reference": res["num_reference"], "grid": res["images"], "cpu_s": time.process_time() - c0}


def ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _fan_out(fn: Callable[[dict], dict], specs: list[dict], options: dict[str, Any]) -> list[dict]:
    """fn(spec) for every spec as parallel Ray tasks (serially when Ray is not running)."""
    import ray

    if not ray_running():
        return [fn(s) for s in specs]
    task = ray.remote(fn).options(**options)
    return ray.get([task.remote(s) for s in specs])


def _side_by_side(grids: dict[str, np.ndarray], nrow: int):
    """One image: each sampler's grid, left to right, with a gap (same noise seed and labels)."""
    from biflow.data import grid_image

    images = [np.asarray(grid_image(g, nrow=nrow)) for g in grids.values()]
    h = max(i.shape[0] for i in images)
    pad = lambda i: np.pad(i, [(0, h - i.shape[0]), (0, 12)] + [(0, 0)] * (i.ndim - 2), constant_values=255)  # noqa: E731
    return np.concatenate([pad(i) for i in images], axis=1)[:, :-12]


def run_evaluate(ctx: StepContext) -> dict[str, Any]:
    from PIL import Image

    from biflow.data import load_split, save_grid
    from biflow.metrics import Reference, get_feature_net, reference_stats
    from biflow.training.loop import resolve_device

    ev = ctx.cfg.pipeline.evaluate
    cache_dir = metrics_cache(ctx.storage)
    ddir = data_dir(ctx)
    device = resolve_device(ev.device)
    # Train the evaluator / compute the reference statistics once, before the samplers fan out and load them.
    reference = Reference.from_shardset(load_split(ddir, "train"), "train")
    net = get_feature_net(ev.features, inception_weights=ev.inception_weights, reference=reference, cache_dir=cache_dir,
                          device=str(device), log=ctx.log)
    reference_stats(reference, net, cache_dir)
    ckpts = {"1nfe": ctx.input_dir("train_reverse") / ctx.inputs["train_reverse"]["result"]["checkpoint"],
             "exact": ctx.input_dir("train_forward") / ctx.inputs["train_forward"]["result"]["checkpoint"]}
    specs = [dict(sampler=s, checkpoint=str(ckpts[s]), data_dir=str(ddir), cache_dir=str(cache_dir), guidance=ev.guidance,
                  seed=ev.seed, device=ev.device, cpus=ev.cpus, features=ev.features, inception_weights=ev.inception_weights,
                  num_samples=ev.num_samples, batch_size=ev.batch_size, timing_batch=ev.timing_batch,
                  timing_repeats=ev.timing_repeats, grid=ev.grid) for s in ev.samplers]
    ctx.log(f"{', '.join(ev.samplers)}: {ev.num_samples} samples each, {ev.features} features, in parallel")
    results = _fan_out(score_sampler, specs, {"num_cpus": ev.cpus, "num_gpus": ev.gpus})

    nrow = int(np.ceil(np.sqrt(min(ev.grid, ev.num_samples))))
    grids, samplers, metrics = {}, {}, {}
    for res in results:
        s = res.pop("grid")
        grids[res["sampler"]] = s
        save_grid(s, ctx.out / f"samples_{res['sampler']}.png", nrow=nrow)
        samplers[res["sampler"]] = res
        for k in (res["metric_name"], "is", "class_acc", "ms_per_image", "decode_ms_per_image", "images_per_s", "nfe"):
            if res.get(k) is not None:
                metrics[f"{res['sampler']}/{k}"] = res[k]
    both = _side_by_side(grids, nrow)
    Image.fromarray(both).save(ctx.out / "samples_side_by_side.png")
    write_json(ctx.out / "metrics.json", {"samplers": samplers, "metrics": metrics})
    if ctx.run is not None:
        ctx.run.log_metrics(metrics)
        for name, g in grids.items():
            ctx.run.log_artifact(ctx.out / f"samples_{name}.png", "samples")
        ctx.run.log_image(both, "samples/side_by_side.png")
        ctx.run.log_artifact(ctx.out / "metrics.json")
    for s, res in samplers.items():
        ctx.log(f"{s}: {res['metric_name']} {res[res['metric_name']]:.4g}, {res['ms_per_image']:.3g} ms/image, NFE {res['nfe']}")
    parallel = ray_running()  # fan-out tasks ran in other processes: count their CPU time too
    return {"samplers": samplers, "metrics": metrics, "grids": {s: f"samples_{s}.png" for s in grids},
            "side_by_side": "samples_side_by_side.png",
            "child_cpu_s": sum(r["cpu_s"] for r in samplers.values()) if parallel else 0.0}


# ------------------------------------------------------------------------ report
def speed_plot(samplers: dict[str, dict], path: Path):
    """FD/FID against ms/image (log x), one labelled point per sampler; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, r in samplers.items():
        ax.scatter(r["ms_per_image"], r[r["metric_name"]], s=60)
        ax.annotate(f"{name} (NFE {r['nfe']})", (r["ms_per_image"], r[r["metric_name"]]), textcoords="offset points",
                    xytext=(6, 6))
    metric = next(iter(samplers.values()))["metric_name"] if samplers else "fd"
    ax.set_xscale("log")
    ax.set_xlabel("ms / image (log scale)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title("quality vs sampling cost (lower-left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_report(ctx: StepContext) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    ev = ctx.inputs["evaluate"]["result"]
    fwd, rev = ctx.inputs["train_forward"]["result"], ctx.inputs["train_reverse"]["result"]
    samplers = ev["samplers"]
    metrics = dict(ev["metrics"])
    metrics["test/bits_per_dim"] = fwd["metrics"]["test/bits_per_dim"]
    if "1nfe" in samplers and "exact" in samplers:
        metrics["speedup/exact_over_1nfe"] = samplers["exact"]["ms_per_image"] / samplers["1nfe"]["ms_per_image"]
    keys = {name: rec["key"] for name, rec in ctx.inputs.items()}
    report = {"experiment": ctx.cfg.pipeline.experiment, "keys": keys, "metrics": metrics, "samplers": samplers,
              "forward": {"params": fwd["params"], "steps": fwd["training"]["steps"]},
              "reverse": {"params": rev["params"], "steps": rev["training"]["steps"], "registered_model": rev["registered_model"]},
              "outputs": {s: ctx.storage.uri("evaluate", keys["evaluate"], f) for s, f in ev["grids"].items()},
              "config": flatten(ctx.cfg.model_dump(exclude={"pipeline"}))}
    write_json(ctx.out / "report.json", report)
    fig = speed_plot(samplers, ctx.out / "fid_vs_speed.png")
    side = ctx.storage.uri("evaluate", keys["evaluate"], ev["side_by_side"])
    space = ""
    if fwd.get("latent_shape"):  # bits/dim is then per latent dimension
        space = f" as {'x'.join(map(str, fwd['latent_shape']))} latents of the VAE {ctx.cfg.pipeline.latent.vae}"
    lines = [f"# BiFlow pipeline report: {ctx.cfg.pipeline.experiment}", "",
             f"Data: {ctx.cfg.data.name}{space}; forward flow {fwd['params']:,} parameters, {fwd['training']['steps']} steps, "
             f"test bits/dim {_fmt(metrics['test/bits_per_dim'])}; reverse model {rev['params']:,} parameters, "
             f"{rev['training']['steps']} steps.", "",
             "| sampler | NFE | " + " | ".join(["quality", "IS", "class acc", "ms/image"]) + " |", "|---|---|---|---|---|---|"]
    for name, r in samplers.items():
        vae = f" (+{_fmt(r['decode_ms_per_image'])} VAE decoding)" if r.get("decode_ms_per_image") is not None else ""
        lines.append(f"| {name} | {r['nfe']} | {r['metric_name']} {_fmt(r[r['metric_name']])} | {_fmt(r['is'])} | "
                     f"{_fmt(r['class_acc'])} | {_fmt(r['ms_per_image'])}{vae} |")
    if "speedup/exact_over_1nfe" in metrics:
        lines += ["", f"1-NFE is {metrics['speedup/exact_over_1nfe']:.1f}x faster per image than the exact inverse "
                      f"(batch {next(iter(samplers.values()))['timing']['batch']}, "
                      f"{next(iter(samplers.values()))['timing']['threads']} thread(s) per sampler, {next(iter(samplers.values()))['timing']['device']})."]
    if any(r["metric_name"] == "fd_evaluator" for r in samplers.values()):
        lines += ["", "fd_evaluator is the Fréchet distance on a small CNN trained on this dataset: it ranks models "
                      "on one dataset and is not comparable with FID."]
    lines += ["", "![quality vs speed](fid_vs_speed.png)", "", f"Samples (1-NFE and exact, same seed): {side}", ""]
    atomic_write_bytes(ctx.out / "report.md", "\n".join(lines).encode())
    if ctx.run is not None:
        ctx.run.log_metrics(metrics)
        ctx.run.log_figure(fig, "fid_vs_speed.png")
        ctx.run.log_artifact(ctx.out / "report.json")
        ctx.run.log_artifact(ctx.out / "report.md")
    plt.close(fig)
    return {"metrics": metrics, "report": "report.md", "report_json": "report.json", "plot": "fid_vs_speed.png"}


# ------------------------------------------------------------------------- DAG
_DATA_CODE = ("data", "atomic.py")
_FORWARD_CODE = _DATA_CODE + ("models/forward_flow.py", "models/layers.py", "objectives/nll.py", "training",
                              "checkpoint.py", "pipeline/raytrain.py")
STEPS: dict[str, StepDef] = {s.name: s for s in (
    StepDef("prepare", (), ("data",), _DATA_CODE, run_prepare, lambda cfg: {"num_cpus": 1}, _data_identity),
    # Ray Data's read tasks and encoding actors reserve their own CPUs/GPUs: the driving task takes none.
    StepDef("latent", ("prepare",), ("pipeline.latent",), _DATA_CODE + ("latent",), run_latent,
            lambda cfg: {"num_cpus": 0}, _vae_identity, enabled=lambda cfg: cfg.pipeline.latent is not None),
    StepDef("train_forward", ("prepare", "latent"), ("forward", "train_forward"), _FORWARD_CODE, run_train_forward,
            _training_resources("train_forward")),
    StepDef("train_reverse", ("prepare", "latent", "train_forward"), ("reverse", "reverse_loss", "train_reverse"),
            _FORWARD_CODE + ("models", "objectives", "latent/vae.py"), run_train_reverse, _training_resources("train_reverse")),
    StepDef("evaluate", ("prepare", "train_forward", "train_reverse"), ("pipeline.evaluate",),
            ("metrics", "sampling", "models", "commands/eval.py", "pipeline/steps.py"), run_evaluate,
            lambda cfg: {"num_cpus": cfg.pipeline.evaluate.cpus, "num_gpus": cfg.pipeline.evaluate.gpus}),
    StepDef("report", ("train_forward", "train_reverse", "evaluate"), (), ("pipeline/steps.py",), run_report,
            lambda cfg: {"num_cpus": 1}),
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
