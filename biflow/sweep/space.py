"""Search-space files (tune_spaces/*.yaml): schema, distributions, coupled cases, validation before anything runs.

A space file says what a sweep varies and how it is run:

    metric: fd_evaluator            # final objective of every trial (fd_evaluator | fid), lower is better
    scheduler: {type: asha, grace_period: 100, reduction_factor: 3}   # early stopping on the validation metric
    num_samples: 4                  # Tune's num_samples: every grid point is repeated, random axes drawn anew
    max_concurrent: 2               # trials at once (default: as many as the CPUs allow)
    steps: 400                      # train_reverse.steps of every trial (trials are short)
    report_every: 50                # steps between validation reports (what the scheduler sees)
    evaluate: {num_samples: 500}    # pipeline.evaluate overrides for the final FD/FID
    fixed: {train_reverse.lr: 1e-3} # flat config keys held at one value for the whole sweep
    params:                         # flat config key -> a distribution
      reverse_loss.adaptive_p: {uniform: [0.0, 1.5]}
      reverse.depth: {grid: [5, 10]}
      strategy:                     # a named axis whose values set several keys at once
        cases:
          hidden_alignment: {}
          hidden_distillation: {reverse_loss.strategy: hidden_distillation, reverse.head_feedback: true}

`load_space` (biflow/sweep/loading.py) validates all of it: every key must be a flat key of the experiment config (or of
`pipeline.evaluate`), every range non-empty, every distribution one Tune knows, and every value a
trial can take must give a valid experiment config (alone, and in every combination of the discrete
axes). Problems are one-line `ConfigError`s naming the file and the key, before Ray starts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from biflow.config import (FLOW_GEOMETRY, ConfigError, ExperimentConfig, ForwardConfig, ReverseConfig, Section,
                           apply_overrides, build_config, flatten)

# name -> (what its argument is, how many numbers it takes or None for a list / mapping)
DISTRIBUTIONS: dict[str, tuple[str, int | None]] = {
    "choice": ("a list of values, one drawn at random per trial", None),
    "grid": ("a list of values, every one tried (Tune grid_search)", None),
    "uniform": ("[lo, hi]: a float drawn uniformly", 2),
    "loguniform": ("[lo, hi], 0 < lo: a float drawn uniformly in log space", 2),
    "quniform": ("[lo, hi, q]: uniform, rounded to a multiple of q", 3),
    "qloguniform": ("[lo, hi, q], 0 < lo: log-uniform, rounded to a multiple of q", 3),
    "randint": ("[lo, hi]: an integer in lo..hi-1 (hi excluded, as Tune)", 2),
    "qrandint": ("[lo, hi, q]: an integer multiple of q in lo..hi (hi included, as Tune)", 3),
    "cases": ("{name: {key: value, ...}}: named settings of several keys, every case tried", None),
}
GRID_KINDS = ("grid", "cases")  # expanded by Tune: the trial count multiplies
SWEEPABLE_EVALUATE = "pipeline.evaluate."  # evaluation settings may be swept too (e.g. the guidance scale)
FORWARD_SECTIONS = ("forward.", "train_forward.")  # keys that change stage 1: such trials train their own F
MAX_COMBINATIONS = 512  # discrete combinations validated one by one; beyond that each axis alone
EXACT_CASE = "exact"  # table rows with this case are the forward flow's exact inverse, not a trial


class SchedulerSpec(Section):
    """Which trials stop early, judged on a validation metric reported while they train."""

    type: Literal["asha", "fifo"] = Field("asha", description="asha: asynchronous successive halving; fifo: no early stopping")
    # (Tune's median rule, HyperBand and PBT pause and restore trials from checkpoints: not offered, see docs/SWEEPS.md)
    metric: Literal["val_fd", "val_recon", "loss"] | None = Field(None, description=(
        "val_fd: the final metric on val_images samples of the EMA weights (default with evaluator features); "
        "val_recon: |G(F(x~)) - x|^2 on held-out images (default with Inception: its features cost ~0.5 s/image on CPU); "
        "loss: the training loss (not comparable across loss weightings)"))
    grace_period: int | None = Field(None, ge=1, description="steps before a trial can be stopped (None: 2 * report_every)")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung")
    brackets: int = Field(1, ge=1, description="ASHA brackets")
    max_t: int | None = Field(None, ge=1, description="steps at which a trial is complete (None: the trials' steps)")


class TableRow(Section):
    section: str = Field(description='group of rows, e.g. "alignment strategy"')
    row: str = Field(description='row label, e.g. "hidden alignment"')
    case: str = Field(description="value of the table's axis this row shows; \"exact\" = the forward flow's exact inverse")
    paper: float | None = Field(None, description="the paper's number for this row (None: not reported)")
    note: str | None = Field(None, description="shown in the table's note column")


class TableSpec(Section):
    """A results table laid out like the paper's: one row per case of one `cases` axis."""

    axis: str = Field(description="the params axis (a `cases` axis) whose case names the rows refer to")
    title: str = "Ablation"
    paper_metric: str = Field("paper FID", description="column header of the paper's numbers")
    rows: list[TableRow]


class SpaceFile(Section):
    """The YAML schema; `params` is parsed into `Param`s by `load_space`."""

    description: str = Field("", description="one paragraph for people (shown by `biflow sweep` and in MLflow)")
    metric: Literal["fd_evaluator", "fid"] = Field(
        "fd_evaluator", description="final objective (lower is better); fid needs Inception")
    num_samples: int = Field(1, ge=1, description="Tune num_samples: repeats of the grid / draws of the random axes")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (None: as many as the CPUs allow)")
    seed: int = Field(0, description="seed of the random search (which values the random axes draw)")
    steps: int | None = Field(None, ge=1, description="train_reverse.steps of every trial (None: the pipeline's)")
    report_every: int = Field(50, ge=1, description="steps between validation reports (train_reverse.log_every)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs (= torch threads) of one in-process trial")
    val_images: int = Field(256, ge=1, description="held-out test images of the validation metric")
    reference_exact: bool = Field(
        True, description="also evaluate the shared forward flow's exact sampler once (a reference point)")
    scheduler: SchedulerSpec = SchedulerSpec()
    evaluate: dict[str, Any] = Field({}, description="pipeline.evaluate overrides for the trials' final evaluation")
    fixed: dict[str, Any] = Field({}, description="flat key -> value, the same for every trial")
    params: dict[str, Any] = Field(description="flat key (or axis name) -> distribution")
    table: TableSpec | None = Field(None, description="a paper-style table (ablation.yaml)")


@dataclass(frozen=True)
class Param:
    """One axis of the search space."""

    name: str  # flat config key, or the axis name of a `cases` axis
    kind: str  # a key of DISTRIBUTIONS
    values: tuple = ()  # choice / grid values; the numbers of the range kinds; case names for cases
    cases: dict[str, dict[str, Any]] | None = None  # cases: name -> {flat key: value}

    @property
    def is_grid(self) -> bool:
        return self.kind in GRID_KINDS

    @property
    def is_discrete(self) -> bool:
        return self.kind in ("choice", "grid", "cases")

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this axis sets."""
        if self.cases is not None:
            return tuple(sorted({k for case in self.cases.values() for k in case}))
        return (self.name,)

    def tune(self):
        """The Tune search-space object."""
        from ray import tune

        if self.kind == "grid" or self.kind == "cases":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def probe_values(self) -> list[Any]:
        """Values validated before the sweep: every discrete value, the ends (and middle) of a range."""
        if self.is_discrete:
            return list(self.values)
        lo, hi = self.values[0], self.values[1]
        if self.kind == "randint":
            return sorted({lo, hi - 1})
        if self.kind == "qrandint":
            q = self.values[2]
            return sorted({math.ceil(lo / q) * q, math.floor(hi / q) * q})
        if self.kind in ("loguniform", "qloguniform"):
            return [lo, math.sqrt(lo * hi), hi]
        return [lo, (lo + hi) / 2, hi]

    def settings(self, value: Any) -> dict[str, Any]:
        """flat key -> value for one sampled value of this axis."""
        if self.cases is not None:
            return dict(self.cases[value])
        return {self.name: value}

    def describe(self) -> str:
        if self.cases is not None:
            return f"{self.name}: cases {', '.join(self.values)}"
        return f"{self.name}: {self.kind} {list(self.values)}"


@dataclass
class Space:
    """A validated space file."""

    path: Path
    spec: SpaceFile
    params: list[Param]
    raw: dict[str, Any] = field(default_factory=dict)  # the file as loaded (for MLflow)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def changes_forward(self) -> bool:
        """Whether some trial changes stage 1 (then trials train or reuse their own cached forward flow)."""
        return any(k.startswith(FORWARD_SECTIONS) for p in self.params for k in p.keys)

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params if p.is_grid)

    def num_trials(self, num_samples: int | None = None) -> int:
        return self.grid_size() * (num_samples or self.spec.num_samples)

    def param_space(self) -> dict[str, Any]:
        return {"params": {p.name: p.tune() for p in self.params}}

    def settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """Sampled axis values -> the flat config keys they set (cases expanded)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in values:
                out.update(p.settings(values[p.name]))
        return out

    def label(self, values: dict[str, Any]) -> str:
        """A short human label of one trial's values (cases by name)."""
        parts = []
        for p in self.params:
            if p.name not in values:
                continue
            v = values[p.name]
            short = p.name if p.cases is not None else p.name.rsplit(".", 1)[-1]
            parts.append(f"{short}={_short(v)}")
        return ", ".join(parts) or "base"

    def overrides(self) -> dict[str, Any]:
        """Flat keys every trial gets from the space file itself: fixed, steps, report_every."""
        out = dict(self.spec.fixed)
        if self.spec.steps is not None:
            out["train_reverse.steps"] = self.spec.steps
        out["train_reverse.log_every"] = self.spec.report_every
        out.update({f"pipeline.evaluate.{k}": v for k, v in self.evaluate_overrides().items()})
        return out

    @property
    def scheduler_metric(self) -> str:
        """What the scheduler judges: scheduler.metric, else val_fd with evaluator features and val_recon with Inception."""
        chosen = self.spec.scheduler.metric
        return chosen or ("val_fd" if self.evaluate_overrides()["features"] == "evaluator" else "val_recon")

    def evaluate_overrides(self) -> dict[str, Any]:
        ev = dict(self.spec.evaluate)
        ev.setdefault("features", "inception" if self.spec.metric == "fid" else "evaluator")
        return ev

    def trial_config(self, base: dict[str, Any], values: dict[str, Any], where: str = "trial"):
        """The pipeline config of one trial: base (raw pipeline data) + space overrides + sampled values."""
        from biflow.pipeline.spec import PipelineConfig

        data = copy.deepcopy(base)
        apply_overrides(data, {**self.overrides(), **self.settings(values)}, where)
        cfg = build_config(PipelineConfig, data, where)
        check_coupled(cfg, where)
        return cfg


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def sweepable_keys() -> set[str]:
    """Flat keys a space may set: every experiment key except data.* (FD is measured against the data), and pipeline.evaluate.*."""
    from biflow.pipeline.spec import EvaluateSection

    keys = {k for k in flatten(ExperimentConfig()) if not k.startswith("data.")}
    keys |= {SWEEPABLE_EVALUATE + k for k in EvaluateSection.model_fields}
    return keys


def check_coupled(cfg, where: str) -> None:
    """What pydantic cannot see: settings that must agree with each other or with the trained forward flow."""
    from biflow.objectives.reverse import STRATEGY_FEEDBACK

    need = STRATEGY_FEEDBACK.get(cfg.reverse_loss.strategy)
    if need is not None and cfg.reverse.head_feedback != need:
        raise ConfigError(f"{where}: reverse_loss.strategy={cfg.reverse_loss.strategy} needs reverse.head_feedback={need} "
                          "(set both in one `cases` entry)")
    # G takes its geometry and block count from F at training time: check the pair as it will be built.
    side = 8 if cfg.data.name == "digits" else cfg.data.image_size  # digits are always 8 px
    try:
        fwd = ForwardConfig(**{**cfg.forward.model_dump(), "image_size": side})
    except ValidationError as err:
        raise ConfigError(f"{where}: forward (for {side} px images): {_first(err)}") from None
    try:
        ReverseConfig.for_flow(fwd, **cfg.reverse.model_dump(exclude=set(FLOW_GEOMETRY)))
    except ValidationError as err:
        raise ConfigError(f"{where}: reverse (built for the flow's {fwd.num_blocks} blocks, {side} px): {_first(err)}") from None


def _first(err: ValidationError) -> str:
    return err.errors()[0]["msg"].removeprefix("Value error, ")
