"""What a sweep leaves behind: the Pareto front, the quality-vs-speed figure, trials.csv, the paper-style
ablation table, and the best trial written back as a runnable pipeline file.

Rows are plain dicts, one per trial (plus one for the exact-inverse reference when there is one):

    trial_id, label, status (finished | stopped_early | failed | interrupted), values {axis: value},
    <metric>, ms_per_image, nfe, class_acc, val_fd, val_recon, steps_trained, forward_key, run_id, pareto
"""
from __future__ import annotations

import copy
import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from biflow.atomic import atomic_write_bytes
from biflow.config import apply_overrides
from biflow.metrics.format import fmt
from biflow.sweep.space import EXACT_CASE, Space

REFERENCE_ID = "exact"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (cost, quality-loss) point: whether no other point is at least as good in both and better in one."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _ok(row: dict[str, Any], metric: str) -> bool:
    return row.get("status") == "finished" and _num(row.get(metric)) and _num(row.get("ms_per_image"))


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mark_pareto(rows: list[dict[str, Any]], metric: str) -> None:
    """Set row["pareto"] over the finished rows (reference included) by (ms_per_image, metric)."""
    scored = [r for r in rows if _ok(r, metric)]
    for r in rows:
        r["pareto"] = False
    for r, on in zip(scored, pareto_front([(r["ms_per_image"], r[metric]) for r in scored])):
        r["pareto"] = on


def rank_agreement(rows: list[dict[str, Any]], metric: str, scheduler_metric: str) -> float | None:
    """Spearman correlation, over finished trials, of the scheduler's last validation value and the final metric.

    Near 1: early stopping ranked trials the way the final score does; near 0 or negative: it did not.
    """
    pairs = [(r[scheduler_metric], r[metric]) for r in rows
             if r["trial_id"] != REFERENCE_ID and _ok(r, metric) and _num(r.get(scheduler_metric))]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(rho) if math.isfinite(rho) else None


def best_trial(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    trials = [r for r in rows if r["trial_id"] != REFERENCE_ID and _ok(r, metric)]
    return min(trials, key=lambda r: r[metric]) if trials else None


# ------------------------------------------------------------------- figure
def pareto_plot(rows: list[dict[str, Any]], metric: str, path: Path, title: str):
    """metric against ms/image (log x): every finished trial, the Pareto front in red, the exact inverse as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    trials = [r for r in rows if r["trial_id"] != REFERENCE_ID and _ok(r, metric)]
    ref = [r for r in rows if r["trial_id"] == REFERENCE_ID and _ok(r, metric)]
    ax.scatter([r["ms_per_image"] for r in trials], [r[metric] for r in trials], s=28, alpha=0.75, color="tab:blue",
               label=f"reverse-model trials ({len(trials)})")
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["ms_per_image"])
    if front:
        ax.step([r["ms_per_image"] for r in front], [r[metric] for r in front], where="post", color="tab:red", lw=1.2)
        ax.scatter([r["ms_per_image"] for r in front], [r[metric] for r in front], s=60, facecolors="none",
                   edgecolors="tab:red", lw=1.5, label="Pareto front")
        for r in front:
            ax.annotate(r["label"][:40], (r["ms_per_image"], r[metric]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    for r in ref:
        ax.scatter([r["ms_per_image"]], [r[metric]], marker="*", s=160, color="black",
                   label=f"exact inverse (NFE {r.get('nfe', '?')})")
    ax.set_xscale("log")
    ax.set_xlabel("ms / image (log scale; measured serially after the sweep)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return fig


# -------------------------------------------------------------------- tables
def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def trials_csv(rows: list[dict[str, Any]], space: Space, metric: str) -> str:
    """One line per trial (and the reference): status, axis values, scores, Pareto membership, MLflow run."""
    axes = [p.name for p in space.params]
    cols = ["trial_id", "status", "label", *axes, metric, "ms_per_image", "nfe", "class_acc", "val_fd", "val_recon",
            "steps_trained", "pareto", "forward_key", "run_id"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        values = r.get("values", {})
        w.writerow([_cell(values.get(c)) if c in axes else _cell(r.get(c)) for c in cols])
    return buf.getvalue()


def ablation_table(space: Space, rows: list[dict[str, Any]], metric: str, dataset: str) -> tuple[str, list[dict]]:
    """The paper's ablation table with our numbers beside it (markdown), and its rows as dicts."""
    table = space.spec.table
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        case = REFERENCE_ID if r["trial_id"] == REFERENCE_ID else r.get("values", {}).get(table.axis)
        if case is not None:
            by_case.setdefault(case, []).append(r)
    shown = metric.upper() if metric == "fid" else metric
    lines = [f"## {table.title}", "",
             f"| | setting | {table.paper_metric} | ours: {shown} ({dataset}) | ms/image | NFE | trials | note |",
             "|---|---|---|---|---|---|---|---|"]
    out_rows, last = [], None
    for row in table.rows:
        case = REFERENCE_ID if row.case == EXACT_CASE else row.case
        got = by_case.get(case, [])
        done = [r for r in got if _ok(r, metric)]
        vals = [r[metric] for r in done]
        mean = statistics.fmean(vals) if vals else None
        sd = statistics.stdev(vals) if len(vals) > 1 else None
        ms = statistics.fmean(r["ms_per_image"] for r in done) if done else None
        ours = fmt(mean, missing="—") + (f" ± {fmt(sd, 2)}" if sd is not None else "")
        if not done:
            states = sorted({r.get("status", "?") for r in got}) or ["not run"]
            ours = "— (" + ", ".join(states) + ")"
        count = f"{len(done)}/{len(got)}" if case != REFERENCE_ID else "reference"
        nfe = done[0].get("nfe") if done else None
        section = row.section if row.section != last else ""
        last = row.section
        paper = "—" if row.paper is None else f"{row.paper:.2f}"
        lines.append(f"| {section} | {row.row} | {paper} | {ours} | {fmt(ms, 3, missing='—')} | {nfe if nfe is not None else '—'} "
                     f"| {count} | {row.note or ''} |")
        out_rows.append({"section": row.section, "setting": row.row, "case": row.case, "paper": row.paper,
                         "ours": mean, "ours_std": sd, "ms_per_image": ms, "nfe": nfe, "finished": len(done),
                         "trials": len(got)})
    lines += ["", f"Paper: {table.paper_metric}. Ours: {shown} on {dataset}, mean over finished trials (± std when "
                  "there are several seeds); ms/image measured one sampler at a time after the sweep "
                  "(pipeline.evaluate: timing_batch, timing_repeats, cpus)."]
    if metric == "fd_evaluator":
        lines += ["fd_evaluator is the Fréchet distance on a small CNN trained on this dataset: compare the ordering "
                  "of the rows with the paper's, not the values."]
    return "\n".join(lines) + "\n", out_rows


# ------------------------------------------------------------ best pipeline
def best_pipeline(space: Space, base: dict[str, Any], row: dict[str, Any], metric: str, pipeline_path: Path,
                  sweep: str) -> str:
    """The best trial as a pipeline file: the original file + the sweep's fixed settings + the trial's values.

    Execution-only sweep settings (report interval, the sweep's evaluation overrides) are left out, so
    `biflow run` evaluates it like every other pipeline run.
    """
    data = copy.deepcopy(base)
    keep = {k: v for k, v in space.overrides().items() if k != "train_reverse.log_every" and not k.startswith("pipeline.evaluate.")}
    changed = {**keep, **space.settings(row.get("values", {}))}
    apply_overrides(data, changed, "best trial")
    header = [f"# Best trial of sweep {sweep} ({space.path.name} over {pipeline_path.name}): trial {row['trial_id']}, "
              f"{metric} {row[metric]:.4g}, {row.get('ms_per_image', float('nan')):.3g} ms/image.",
              f"#   biflow run <this file>      # trains it with the trial's settings ({row.get('steps_trained', '?')} stage-2 steps)",
              "# Settings the sweep chose (everything else is the original pipeline file):"]
    header += [f"#   {k}: {v!r}" for k, v in sorted(changed.items())]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
