"""A sweep after its trials: the exact-inverse reference, the collected trial rows, serial timing of every
finished trial's sampler, and the report files (Pareto front, tables, best pipeline) on the parent run."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biflow.pipeline.cache import Storage
from biflow.pipeline.spec import load_pipeline
from biflow.pipeline.tracking import RunRef, StepRun
from biflow.sweep.report import (REFERENCE_ID, ablation_table, best_pipeline, best_trial, mark_pareto, pareto_plot,
                                 rank_agreement, trials_csv, write_text)
from biflow.sweep.space import Space
from biflow.sweep.tracking import KIND, STATUS, children, start_run
from biflow.sweep.trial import FINAL, sampler_spec
from biflow.sweep.upstream import forward_checkpoint


@dataclass
class SweepResult:
    name: str  # <space>-<hash>/run-<n>
    run_dir: Path
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # trials (+ the reference), as in trials.csv
    best: dict[str, Any] | None = None
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    upstream: dict[str, str] = field(default_factory=dict)  # step -> "cached" | "ran"

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["trial_id"] != REFERENCE_ID and r["status"] == status)


# ------------------------------------------------------------- the reference
def start_reference(space: Space, cfg, ctx, storage: Storage, run_dir: Path, echo):
    """The shared forward flow's exact sampler, scored once (a Ray task beside the trials); cached in the run dir."""
    import ray

    from biflow.pipeline.context import data_dir
    from biflow.pipeline.evaluation import score_sampler

    cached = run_dir / "exact.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    fwd_path, _ = forward_checkpoint(ctx)
    threads = max(1, int(space.spec.cpus_per_trial))
    spec = sampler_spec("exact", fwd_path, cfg, data_dir(ctx), storage, threads)
    echo(f"  reference: the exact inverse of forward flow {ctx.inputs['train_forward']['key']} "
         f"({cfg.pipeline.evaluate.num_samples} samples, beside the trials)")
    ref = ray.remote(score_sampler).options(num_cpus=threads, name="biflow:sweep-exact").remote(spec)
    return {"pending": ref, "checkpoint": str(fwd_path), "forward_key": ctx.inputs["train_forward"]["key"]}


def finish_reference(ref, space: Space, cfg, storage, run_dir: Path, parent: StepRun, echo) -> dict[str, Any] | None:
    import ray

    from biflow.data import save_grid

    if ref is None:
        return None
    if "pending" in ref:
        res = ray.get(ref.pop("pending"))
        grid = res.pop("grid")
        save_grid(grid, run_dir / "samples_exact.png", nrow=int(len(grid) ** 0.5 + 0.999))
        metric = res["metric_name"]
        ref = {"trial_id": REFERENCE_ID, "label": "exact inverse", "status": "finished", "values": {},
               metric: res[metric], "nfe": res["nfe"], "class_acc": res["class_acc"], "checkpoint": ref["checkpoint"],
               "forward_key": ref["forward_key"], "ms_per_image_in_trial": res["ms_per_image"]}
        write_text(run_dir / "exact.json", json.dumps(ref, indent=1) + "\n")
    return dict(ref)


# ---------------------------------------------------------------- collecting
def collect(grid, space: Space, parent: StepRun) -> list[dict[str, Any]]:
    """One row per Tune trial: status from its last result (and the MLflow run the callback kept)."""
    runs = {r.data.tags.get("biflow.trial_id"): r for r in children(parent.ref, "trial")}
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or Path(res.path).name
        run = runs.get(trial_id)
        tag = run.data.tags.get(STATUS) if run is not None else None
        if res.error is not None:
            status = "failed"
        elif m.get(FINAL):
            status = "finished"
        elif tag == "stopped_early":
            status = "stopped_early"
        else:
            status = "interrupted"
        metric = space.spec.metric
        values = (res.config or {}).get("params", {})
        rows.append({"trial_id": trial_id, "label": space.label(values), "status": status, "values": values,
                     metric: m.get(metric) if status == "finished" else None, "nfe": m.get("nfe"),
                     "class_acc": m.get("class_acc"), "val_recon": _last(run, "val_recon", m),
                     "val_fd": _last(run, "val_fd", m), "loss": _last(run, "loss", m),
                     "steps_trained": m.get("steps_trained", m.get("step")), "forward_key": m.get("forward_key"),
                     "checkpoint": m.get("checkpoint"), "run_id": run.info.run_id if run is not None else None,
                     "error": str(res.error)[:300] if res.error is not None else None})
    return sorted(rows, key=lambda r: r["trial_id"])


def _last(run, key: str, metrics: dict[str, Any]) -> float | None:
    if run is not None and key in run.data.metrics:
        return run.data.metrics[key]
    return metrics.get(key)


def end_open_trials(parent: StepRun, why: str) -> None:
    """Child runs still RUNNING (trials, or pipeline steps the sweep ran, that did not finish) end KILLED;
    trial runs are tagged `why` (a resumed sweep reopens them)."""
    try:
        for run in children(parent.ref):
            if run.info.status == "RUNNING":
                if run.data.tags.get(KIND) == "trial":
                    StepRun(RunRef(parent.ref.uri, parent.ref.experiment_id, run.info.run_id)).set_tags({STATUS: why})
                parent.client.set_terminated(run.info.run_id, "KILLED")
    except Exception:  # noqa: BLE001 - cleanup on the way out must not hide the original error
        pass


# -------------------------------------------------------------------- timing
def time_samplers(rows: list[dict], reference: dict | None, cfg, space: Space, echo, rounds: int = 3) -> None:
    """ms/image of every finished trial (and the reference), one sampler at a time in this process.

    The shared `time_sampler` (median of pipeline.evaluate.timing_repeats batches) runs `rounds` times,
    round-robin over the samplers, and each keeps its fastest round: load from other processes slows
    whichever sampler it happens to hit, and the minimum is the least disturbed measurement.
    """
    import torch

    from biflow.device import resolve_device
    from biflow.metrics import time_sampler
    from biflow.metrics.evaluate import balanced_labels
    from biflow.sampling.draw import load_sampler

    ev = cfg.pipeline.evaluate
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(ev.cpus)))
    device = resolve_device(ev.device, "pipeline.evaluate.device")
    todo = [r for r in rows if r["status"] == "finished" and r.get("checkpoint")] + ([reference] if reference else [])
    echo(f"  timing {len(todo)} sampler(s) one at a time: batch {ev.timing_batch}, median of {ev.timing_repeats}, "
         f"best of {rounds} rounds, {max(1, int(ev.cpus))} thread(s)")
    try:
        draws = []
        for r in todo:
            path = Path(r["checkpoint"])
            sampler = "exact" if r["trial_id"] == REFERENCE_ID else "1nfe"
            s = load_sampler(path, sampler, ev.guidance, True, ev.seed, device)

            def draw(b: int, s=s):
                y = balanced_labels(b, s.num_classes)
                return s.sample(b, None if y is None else torch.from_numpy(y))

            draws.append(draw)
            r["nfe"], r["ms_per_image"] = s.nfe, float("inf")
        for _ in range(rounds):
            for r, draw in zip(todo, draws):
                t = time_sampler(draw, ev.timing_batch, repeats=ev.timing_repeats, warmup=1, device=device)
                r["ms_per_image"] = min(r["ms_per_image"], t["ms_per_image"])
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------------- report
def write_report(result: SweepResult, space: Space, cfg, base: dict, parent: StepRun, run_dir: Path, pipeline_path: Path,
            echo) -> None:
    import matplotlib.pyplot as plt

    metric = space.spec.metric
    rows = result.rows
    mark_pareto(rows, metric)
    best = best_trial(rows, metric)
    result.best = best
    files: dict[str, Path] = {}
    title = f"{space.name}: {metric} vs ms/image ({sum(r['status'] == 'finished' for r in rows)} scored)"
    fig = pareto_plot(rows, metric, run_dir / "pareto.png", title)
    files["pareto"] = run_dir / "pareto.png"
    files["trials"] = write_text(run_dir / "trials.csv", trials_csv(rows, space, metric))
    agreement = rank_agreement(rows, metric, space.scheduler_metric)
    summary = {"sweep": result.name, "metric": metric, "best": best, "rows": rows,
               "counts": {s: result.count(s) for s in ("finished", "stopped_early", "failed")},
               "scheduler_metric": space.scheduler_metric, "scheduler_metric_spearman": agreement}
    if space.spec.table is not None:
        md, table_rows = ablation_table(space, rows, metric, cfg.data.name)
        files["table"] = write_text(run_dir / "ablation.md", md)
        summary["table"] = table_rows
    if best is not None:
        text = best_pipeline(space, base, best, metric, pipeline_path, result.name)
        files["best_pipeline"] = write_text(run_dir / "best_pipeline.yaml", text)
        load_pipeline(files["best_pipeline"])  # it must be runnable as written
    files["summary"] = write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    parent.log_figure(fig, "pareto.png")
    plt.close(fig)
    for key in ("trials", "table", "best_pipeline", "summary"):
        if key in files:
            parent.log_artifact(files[key])
    for png in (run_dir / "samples_exact.png",):
        if png.is_file():
            parent.log_artifact(png, "samples")
    _log_reference(parent, rows, metric)
    metrics = {f"trials/{s}": result.count(s) for s in ("finished", "stopped_early", "failed")}
    if agreement is not None:
        metrics["scheduler_metric_spearman"] = agreement
    if best is not None:
        metrics.update({f"best/{metric}": best[metric], "best/ms_per_image": best.get("ms_per_image")})
        parent.set_tags({"biflow.best_trial": best["trial_id"], "biflow.best_run": best.get("run_id") or "-"})
    for r in rows:  # the fair timing on each trial's run too
        if r.get("run_id") and r.get("ms_per_image") is not None:
            StepRun(RunRef(parent.ref.uri, parent.ref.experiment_id, r["run_id"])).log_metrics(
                {"ms_per_image": r["ms_per_image"], "pareto": float(bool(r.get("pareto")))})
    parent.log_metrics(metrics)
    parent.set_tags({"biflow.sweep.state": "finished"})
    parent.end("FINISHED")
    result.files = files
    echo(f"  finished {result.count('finished')}, stopped early {result.count('stopped_early')}, "
         f"failed {result.count('failed')}")
    if agreement is not None:
        echo(f"  rank agreement of {space.scheduler_metric} (last report) with {metric}: Spearman {agreement:+.2f}")
    if best is not None:
        echo(f"  best: trial {best['trial_id']} ({best['label']}): {metric} {best[metric]:.4g}, "
             f"{best.get('ms_per_image', float('nan')):.3g} ms/image -> {files['best_pipeline']}")
    if "table" in files:
        echo("")
        echo(files["table"].read_text())


def _log_reference(parent: StepRun, rows: list[dict], metric: str) -> None:
    """The exact inverse as its own child run (kind reference), so MLflow's compare view shows it beside the trials."""
    ref = next((r for r in rows if r["trial_id"] == REFERENCE_ID), None)
    if ref is None:
        return
    run = start_run(parent.ref, "exact inverse (reference)", {KIND: "reference", "biflow.forward_key": ref.get("forward_key")})
    run.log_params({"sampler": "exact", "forward_checkpoint": ref.get("checkpoint")})
    run.log_metrics({k: ref.get(k) for k in (metric, "ms_per_image", "nfe", "class_acc")})
    run.log_metrics({"pareto": float(bool(ref.get("pareto")))})
    run.end("FINISHED")
