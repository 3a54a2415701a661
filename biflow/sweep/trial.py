"""One sweep trial: train the reverse model G, report a validation metric as it goes, then score it.

`run_trial` is a Ray Tune function trainable. Per trial:

1. its config = the pipeline file + the space file's fixed settings + this trial's sampled values;
2. prepare + train_forward come from the step cache (trials that change stage 1 train their own F once);
3. stage 2 trains with the pipeline's `fit`:
     train_reverse.num_workers == 0   in this process (laptops: one trial per core, actors reused);
     num_workers >= 1                 a Ray Train run per trial (DDP; the trial only drives it);
   every `report_every` steps it writes a checkpoint and reports, from its EMA weights, `val_fd` (the final
   metric at a small N) and `val_recon` (|G(F(x~)) - x|^2 on held-out images), plus the training loss:
   the scheduler stops weak trials early on one of them (`Validator`);
4. the EMA weights are scored like the pipeline's evaluate step (`score_sampler`): fd_evaluator or FID,
   class accuracy, NFE; the last report carries `final = 1`.

Its checkpoint lives in `<sweep>/trials/<trial id>/`, so a trial restarted by `--resume` continues.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biflow.pipeline.cache import Storage
from biflow.pipeline.raytrain import Reports
from biflow.pipeline.tracking import RunRef
from biflow.sweep.space import Space

FINAL = "final"  # key of the last report: present (1) only once the trial is scored
TRAIN_KEYS = ("loss", "recon", "align", "perceptual", "raw/recon", "grad_norm", "images_per_s")  # reported terms


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its sampled values; picklable (sent once through the object store)."""

    space: Space
    base: dict[str, Any]  # raw pipeline data with the command line overrides applied
    storage_root: str
    local_dir: str | None
    parent: RunRef | None  # the sweep's MLflow parent run (upstream steps a trial runs become its children)
    trials_dir: str  # <sweep run>/trials: one checkpoint directory per trial
    ray_storage: str  # Ray Train storage of data-parallel trials
    run_name: str  # the sweep run's name (Ray Train run names derive from it)
    threads: int  # torch threads of an in-process trial
    metrics_cache: str  # trained evaluators and reference statistics (shared with the pipeline)

    def config(self, values: dict[str, Any]):
        """The trial's PipelineConfig, with the execution settings of a trial (threads) applied."""
        cfg = self.space.trial_config(self.base, values)
        pipe = cfg.pipeline.model_copy(update={
            "train_forward": cfg.pipeline.train_forward.model_copy(update={"cpus": float(self.threads)}),
            "evaluate": cfg.pipeline.evaluate.model_copy(update={"cpus": float(self.threads)})})
        return cfg.model_copy(update={"pipeline": pipe})


# ------------------------------------------------------------------ validation
class Validator:
    """What a trial reports while it trains, measured on the EMA weights (what the sampler will use):

    val_fd     Fréchet distance (the sweep's feature network, evaluator features by default) of N samples
               drawn from fixed noise with balanced labels, against the cached reference statistics: the
               final metric at a small N, so early stopping ranks trials the way the final score will;
    val_recon  mean |G(F(x~) | y, w=0) - x|^2 on N fixed held-out test images (F's codes computed once).

    One call costs a pass of G over N codes, one over N noises (+ F's Tweedie step for score denoising)
    and the feature network on N images: milliseconds for digits, so it runs at every report.
    """

    def __init__(self, flow_path: str | Path, images, labels, device: torch.device, guidance: float = 0.0,
                 features=None, reference_stats=None, seed: int = 0):
        """images uint8 (N, H, W, C), labels (N,): the held-out batch (`validation_batch`); features and
        reference_stats: a FeatureNet and the data's FeatureStats for val_fd (None: val_recon only)."""
        from biflow.data import to_model
        from biflow.metrics.evaluate import balanced_labels
        from biflow.training.stages import frozen_flow

        self.flow = frozen_flow(flow_path, device)
        self.device, self.guidance = device, guidance
        self.features, self.reference = features, reference_stats
        x = to_model(images).to(device)  # (N, C, H, W)
        conditional = self.flow.cfg.num_classes > 0
        self.y = torch.as_tensor(labels, dtype=torch.long, device=device) if conditional else None
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=gen).to(device)
        with torch.no_grad():
            self.codes, _, _ = self.flow(x + self.flow.cfg.noise_std * noise, self.y)  # (N, C, H, W)
        self.x = x
        self.noise = torch.randn(x.shape, generator=gen).to(device)  # the prior samples of val_fd
        lab = balanced_labels(len(x), self.flow.cfg.num_classes)
        self.sample_labels = torch.as_tensor(lab, device=device) if lab is not None else None

    @torch.no_grad()
    def __call__(self, checkpoint: str | Path) -> dict[str, float]:
        from biflow.checkpoint import load_checkpoint, read_checkpoint
        from biflow.metrics import as_uint8_nhwc
        from biflow.metrics.frechet import FeatureStats
        from biflow.sampling.exact import tweedie_denoise

        denoising = read_checkpoint(checkpoint).get("denoising")
        model = load_checkpoint(checkpoint, ema=True, device=self.device)
        x_pred, _ = model(self.codes, self.y, 0.0)
        out = {"val_recon": float((x_pred.float() - self.x).pow(2).mean())}
        if self.features is not None:
            samples, _ = model(self.noise, self.sample_labels, self.guidance)
            if denoising == "score":  # the sampler of such a model adds TARFlow's Tweedie step
                samples = tweedie_denoise(self.flow, samples, self.sample_labels)
            stats = FeatureStats.from_features(self.features.features(as_uint8_nhwc(samples)))
            out["val_fd"] = self.reference.frechet(stats)
        return out


def validator_for(cfg, fwd_path: str | Path, data_dir: str | Path, val_batch, cache_dir: str | Path,
                  device: torch.device, want_fd: bool = False) -> Validator:
    """The trial's validator; val_fd loads the (cached) feature network and reference statistics."""
    ev = cfg.pipeline.evaluate
    features = reference = None
    if want_fd or wants_val_fd(cfg):
        from biflow.data import load_split
        from biflow.metrics import Reference, get_feature_net, reference_stats

        ref = Reference.from_shardset(load_split(data_dir, "train"), "train")
        features = get_feature_net(ev.features, inception_weights=ev.inception_weights, reference=ref,
                                   cache_dir=cache_dir, device=str(device))
        reference = reference_stats(ref, features, cache_dir)
    return Validator(fwd_path, *val_batch, device, ev.guidance, features, reference)


def wants_val_fd(cfg) -> bool:
    """val_fd is computed unless the features are Inception on a CPU (~0.5 s per image: too slow for every report)."""
    return cfg.pipeline.evaluate.features == "evaluator" or torch.cuda.is_available()


def validation_batch(data_dir: str | Path, num: int):
    """The first `num` test images and labels (fixed for the whole sweep), as small numpy arrays a worker can receive."""
    from biflow.data import load_split

    test = load_split(data_dir, "test")
    return test.images[:num].copy(), test.labels[:num].copy()


def _train_metrics(step: int, metrics: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {"step": step}
    for k in TRAIN_KEYS:
        if k in metrics:
            out["loss" if k == "loss" else f"train/{k}"] = float(metrics[k])
    return out


# ----------------------------------------------------------------- the trial
def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one trial (config = {"params": {axis: value}})."""
    import ray.tune

    from biflow.config import ExperimentConfig
    from biflow.device import resolve_device
    from biflow.pipeline.context import training_data
    from biflow.pipeline.raytrain import StageJob
    from biflow.sweep.upstream import forward_checkpoint, resolve_upstream, step_context

    trial_id = ray.tune.get_context().get_trial_id()
    values = config["params"]
    cfg = setup.config(values)
    torch.set_num_threads(setup.threads)
    storage = Storage(setup.storage_root, setup.local_dir)
    t0 = time.perf_counter()
    records = resolve_upstream(cfg, storage, setup.parent, remote=False,
                               echo=lambda m: print(f"[trial {trial_id}] {m}", flush=True))
    work = Path(setup.trials_dir) / trial_id
    work.mkdir(parents=True, exist_ok=True)
    ctx = step_context(cfg, storage, records, work)
    fwd_path, fwd_uri = forward_checkpoint(ctx)
    experiment = ExperimentConfig.model_validate(cfg.model_dump(exclude={"pipeline"}))
    job = StageJob(kind="reverse", cfg=experiment, data=training_data(ctx), work_dir=str(work), forward_ckpt=str(fwd_path),
                   forward_ckpt_uri=fwd_uri)
    t_train = time.perf_counter()
    device = resolve_device(cfg.train_reverse.device, "train_reverse.device")
    val_batch = validation_batch(job.data.root, setup.space.spec.val_images)
    want_fd = setup.space.scheduler_metric == "val_fd"
    validator = validator_for(cfg, fwd_path, job.data.root, val_batch, setup.metrics_cache, device, want_fd)
    if cfg.train_reverse.num_workers == 0:
        ckpt, steps, loss = _train_here(job, validator, device)
    else:
        ckpt, steps, loss = _train_on_ray_train(job, cfg, setup, trial_id, val_batch)
    t_eval = time.perf_counter()
    val = validator(ckpt)
    scores = final_scores(ckpt, cfg, job.data.root, storage, setup.threads, work)
    # The validation metrics and the loss repeat the scheduler's metric (Tune requires it in every report);
    # `step` is absent, so the scheduler does not treat this report as another rung.
    ray.tune.report({FINAL: 1, **scores, **val, "loss": loss,
                     "steps_trained": steps, "upstream_s": t_train - t0, "train_s": t_eval - t_train,
                     "eval_s": time.perf_counter() - t_eval, "forward_key": records["train_forward"]["key"],
                     "checkpoint": str(ckpt)})


def _train_here(job, validator: Validator, device: torch.device) -> tuple[Path, int, float]:
    """Stage 2 in this process with the pipeline's `fit`; resumes from the trial's own checkpoint."""
    import ray.tune

    from biflow.pipeline.raytrain import stage_for
    from biflow.training.stages import train_in_memory

    # One checkpoint per report: the validator reads the EMA weights from it, and a restarted trial resumes there.
    train = job.train.model_copy(update={"ckpt_every": job.train.log_every})

    def on_checkpoint(path: Path, step: int, metrics: dict[str, float]) -> None:
        ray.tune.report({**_train_metrics(step, metrics), **validator(path)})

    ckpt = Path(job.work_dir) / job.ckpt_name
    trainer = train_in_memory(stage_for(job, device), job.data, ckpt, train=train, on_checkpoint=on_checkpoint)
    return ckpt, trainer.step, float(trainer.metrics.get("loss", float("nan")))


# -------------------------------------------------------- Ray Train (clusters)
class TrialReports(Reports):
    """The pipeline's Ray Train reports plus, from rank 0, the validation metrics of each checkpoint's EMA weights.

    One checkpoint (and report) per log interval (= report_every); TuneReportCallback forwards rank 0's report
    to the trial, so Tune's scheduler sees the same metrics as for an in-process trial.
    """

    checkpoint_every_log = True

    def __init__(self, cfg, val_batch, cache_dir: str, want_fd: bool):
        self.cfg, self.val_batch, self.cache_dir, self.want_fd = cfg, val_batch, cache_dir, want_fd
        self.validator: Validator | None = None

    def start(self, job, device: torch.device, rank: int) -> None:
        from biflow.pipeline.raytrain import local_input

        if rank == 0:  # the feature net and reference statistics come from the metrics cache (or are rebuilt here)
            self.validator = validator_for(self.cfg, local_input(job.forward_ckpt, job.forward_ckpt_uri), job.data.root,
                                           self.val_batch, self.cache_dir, device, self.want_fd)

    def metrics(self, step: int, metrics: dict[str, float], resumed_from: int) -> dict[str, float]:
        return _train_metrics(step, metrics)

    def extra(self, checkpoint: Path) -> dict[str, float]:
        return self.validator(checkpoint)


def _train_on_ray_train(job, cfg, setup: TrialSetup, trial_id: str, val_batch) -> tuple[Path, int, float]:
    """A TorchTrainer per trial (stable run name: a restarted trial resumes its run) -> (checkpoint, steps, final loss)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from biflow.pipeline.raytrain import train_on_ray

    reports = TrialReports(cfg, val_batch, setup.metrics_cache, setup.space.scheduler_metric == "val_fd")
    dest = Path(job.work_dir) / job.ckpt_name
    summary = train_on_ray(job, cfg.train_reverse.num_workers, cfg.pipeline.train_reverse, setup.ray_storage,
                           f"{setup.run_name}-{trial_id}", dest, reports=reports, callbacks=(TuneReportCallback(),))
    return dest, summary["steps"], float(summary["final"].get("loss", float("nan")))


# ------------------------------------------------------------------- scoring
def sampler_spec(sampler: str, checkpoint: Path, cfg, data_dir: str | Path, storage: Storage, threads: int) -> dict[str, Any]:
    """The pipeline evaluate step's per-sampler spec (score_sampler), from the trial's evaluate settings."""
    from biflow.pipeline.evaluation import metrics_cache

    ev = cfg.pipeline.evaluate
    return dict(sampler=sampler, checkpoint=str(checkpoint), data_dir=str(data_dir), cache_dir=str(metrics_cache(storage)),
                guidance=ev.guidance, seed=ev.seed, device=ev.device, cpus=threads, features=ev.features,
                inception_weights=ev.inception_weights, num_samples=ev.num_samples, max_reference=ev.max_reference,
                batch_size=ev.batch_size,
                timing_batch=min(ev.timing_batch, ev.num_samples), timing_repeats=1, grid=ev.grid)


def final_scores(ckpt: Path, cfg, data_dir: str | Path, storage: Storage, threads: int, out_dir: Path,
                 sampler: str = "1nfe") -> dict[str, Any]:
    """Quality of one sampler (the pipeline's score_sampler) and its sample grid saved in out_dir.

    ms/image measured here runs beside other trials (`ms_per_image_in_trial`); the sweep re-times
    every finished trial serially at the end, which is the `ms_per_image` of the comparison.
    """
    import numpy as np

    from biflow.data import save_grid
    from biflow.pipeline.evaluation import score_sampler

    res = score_sampler(sampler_spec(sampler, ckpt, cfg, data_dir, storage, threads))
    grid = res.pop("grid")
    png = Path(out_dir) / f"samples_{sampler}.png"
    save_grid(grid, png, nrow=int(np.ceil(np.sqrt(len(grid)))))
    metric = res["metric_name"]
    return {metric: float(res[metric]), "metric_name": metric, "class_acc": res["class_acc"], "nfe": res["nfe"],
            "ms_per_image_in_trial": res["ms_per_image"], "samples": str(png), "num_eval_samples": res["num_samples"]}
