"""The evaluate and report steps: score each sampler (in parallel Ray tasks), then the report and its plot.

    evaluate   FD/FID, IS, class accuracy, ms/image (and the VAE's decoding ms/image in latent space), NFE and
               sample grids per sampler
    report     report.json, report.md and the FID-vs-ms/image plot
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from biflow.atomic import atomic_write_bytes
from biflow.config import flatten
from biflow.config.perceptual import describe_perceptual
from biflow.metrics.format import fmt
from biflow.pipeline.cache import Storage
from biflow.pipeline.context import StepContext, data_dir, ray_running, write_json


# ---------------------------------------------------------------------- evaluate
def metrics_cache(storage: Storage) -> Path:
    """Trained evaluators and reference statistics, shared by every run on this storage."""
    return (Path(storage.root) if storage.is_local else storage.local_dir) / "_shared" / "metrics"


def score_sampler(spec: dict[str, Any]) -> dict[str, Any]:
    """One sampler scored on `spec["cpus"]` torch threads (runs as its own Ray task); `score_checkpoint` does the work."""
    import torch

    from biflow.sampling.scoring import score_checkpoint

    torch.set_num_threads(max(1, int(spec["cpus"])))
    num = spec["num_samples"]
    return score_checkpoint(spec["checkpoint"], spec["sampler"], num=num, guidance=spec["guidance"], seed=spec["seed"],
                            device=spec["device"], features=spec["features"], inception_weights=spec["inception_weights"],
                            data_dir=spec["data_dir"], cache_dir=spec["cache_dir"], max_reference=spec["max_reference"],
                            batch=spec["batch_size"],
                            time_batch=min(spec["timing_batch"], num), repeats=spec["timing_repeats"], keep=spec["grid"])


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

    from biflow.data import save_grid
    from biflow.device import resolve_device
    from biflow.sampling.scoring import warm_reference

    ev = ctx.cfg.pipeline.evaluate
    cache_dir = metrics_cache(ctx.storage)
    ddir = data_dir(ctx)
    device = resolve_device(ev.device, "pipeline.evaluate.device")
    warm_reference(ddir, ev.features, ev.inception_weights, cache_dir, device, ctx.log, ev.max_reference)  # once, before the fan-out
    ckpts = {"1nfe": ctx.input_dir("train_reverse") / ctx.inputs["train_reverse"]["result"]["checkpoint"],
             "exact": ctx.input_dir("train_forward") / ctx.inputs["train_forward"]["result"]["checkpoint"]}
    specs = [dict(sampler=s, checkpoint=str(ckpts[s]), data_dir=str(ddir), cache_dir=str(cache_dir), guidance=ev.guidance,
                  seed=ev.seed, device=ev.device, cpus=ev.cpus, features=ev.features, inception_weights=ev.inception_weights,
                  num_samples=ev.num_samples, max_reference=ev.max_reference, batch_size=ev.batch_size, timing_batch=ev.timing_batch,
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


def run_report(ctx: StepContext) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    ev = ctx.inputs["evaluate"]["result"]
    fwd, rev = ctx.inputs["train_forward"]["result"], ctx.inputs["train_reverse"]["result"]
    samplers = ev["samplers"]
    metrics = dict(ev["metrics"])
    for k in ("test/bits_per_dim", "test/nll_noisy_bpd"):  # None: bits/dim of continuous latents has no 8-bit bound
        metrics[k] = fwd["metrics"].get(k)
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
             f"test bits/dim {fmt(metrics['test/bits_per_dim'])} (uniform dequantisation; "
             f"{fmt(metrics['test/nll_noisy_bpd'])} on the Gaussian-noised training data); reverse model {rev['params']:,} parameters, "
             f"{rev['training']['steps']} steps; stage-2 distance: {describe_perceptual(ctx.cfg.reverse_loss.perceptual_list())}.", "",
             "| sampler | NFE | " + " | ".join(["quality", "IS", "class acc", "ms/image"]) + " |", "|---|---|---|---|---|---|"]
    for name, r in samplers.items():
        vae = f" (+{fmt(r['decode_ms_per_image'])} VAE decoding)" if r.get("decode_ms_per_image") is not None else ""
        lines.append(f"| {name} | {r['nfe']} | {r['metric_name']} {fmt(r[r['metric_name']])} | {fmt(r['is'])} | "
                     f"{fmt(r['class_acc'])} | {fmt(r['ms_per_image'])}{vae} |")
    if "speedup/exact_over_1nfe" in metrics:
        lines += ["", f"1-NFE is {metrics['speedup/exact_over_1nfe']:.1f}x faster per image than the exact inverse "
                      f"(batch {next(iter(samplers.values()))['timing']['batch']}, "
                      f"{next(iter(samplers.values()))['timing']['threads']} thread(s) per sampler, {next(iter(samplers.values()))['timing']['device']})."]
    if any(r["metric_name"] == "fd_evaluator" for r in samplers.values()):
        lines += ["", "fd_evaluator is the Fréchet distance on a small CNN trained on this dataset: it ranks models "
                      "on one dataset and is not comparable with FID."]
    fid = [r for r in samplers.values() if r["metric_name"] == "fid"]
    if fid:
        lines += ["", f"FID: InceptionV3 pool features (2048-d), {fid[0]['num_samples']} samples per sampler against "
                      f"{fid[0]['num_reference']} training images; FID depends on these counts (the paper uses 50000), so "
                      "compare only FIDs with the same ones." + ("" if fid[0]["is"] is not None else
                      " IS is n/a: this Inception network has no logits head.")]
    lines += ["", "![quality vs speed](fid_vs_speed.png)", "", f"Samples (1-NFE and exact, same seed): {side}", ""]
    atomic_write_bytes(ctx.out / "report.md", "\n".join(lines).encode())
    if ctx.run is not None:
        ctx.run.log_metrics(metrics)
        ctx.run.log_figure(fig, "fid_vs_speed.png")
        ctx.run.log_artifact(ctx.out / "report.json")
        ctx.run.log_artifact(ctx.out / "report.md")
    plt.close(fig)
    return {"metrics": metrics, "report": "report.md", "report_json": "report.json", "plot": "fid_vs_speed.png"}
