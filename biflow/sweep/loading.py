"""Reading a search-space file: parse every axis, then validate it against the experiment config before Ray
starts (the file format is documented in biflow/sweep/space.py)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from biflow.config import ConfigError, closest, read_yaml_mapping, validate
from biflow.sweep.space import (DISTRIBUTIONS, EXACT_CASE, MAX_COMBINATIONS, SWEEPABLE_EVALUATE, Param, Space, SpaceFile,
                                sweepable_keys)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_param(name: str, spec: Any, where: str, keys: set[str]) -> Param:
    """One `params:` entry -> Param; every problem is a one-line ConfigError."""
    at = f"{where}: params.{name}"
    known = ", ".join(DISTRIBUTIONS)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{at}: expected one distribution as a mapping such as {{choice: [a, b]}}; known: {known}")
    (kind, arg), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{at}: unknown distribution {kind!r}; known: {known}")
    if kind == "cases":
        if name in keys:
            raise ConfigError(f"{at}: a `cases` axis needs a name that is not a config key (e.g. `strategy`), "
                              "since its cases set the keys")
        if not isinstance(arg, dict) or not arg:
            raise ConfigError(f"{at}: cases must be a non-empty mapping {{case name: {{key: value, ...}}}}")
        cases = {}
        for case, settings in arg.items():
            settings = {} if settings is None else settings
            if not isinstance(settings, dict):
                raise ConfigError(f"{at}.{case}: a case is a mapping of flat config keys to values, got {settings!r}")
            if str(case) == EXACT_CASE:
                raise ConfigError(f"{at}.{case}: the case name {EXACT_CASE!r} is reserved for the exact-inverse table row")
            for key in settings:
                check_key(key, f"{at}.{case}", keys)
            cases[str(case)] = dict(settings)
        return Param(name, kind, tuple(cases), cases)
    check_key(name, where + ": params", keys)
    if DISTRIBUTIONS[kind][1] is None:  # choice / grid
        if not isinstance(arg, list):
            raise ConfigError(f"{at}: {kind} takes a list of values, got {arg!r}")
        if not arg:
            raise ConfigError(f"{at}: empty {kind} (give at least one value)")
        return Param(name, kind, tuple(arg))
    n = DISTRIBUTIONS[kind][1]
    if not isinstance(arg, list) or len(arg) != n or not all(_is_number(v) for v in arg):
        raise ConfigError(f"{at}: {kind} takes {DISTRIBUTIONS[kind][0]}, got {arg!r}")
    lo, hi = arg[0], arg[1]
    if kind in ("randint", "qrandint") and not all(isinstance(v, int) for v in arg):
        raise ConfigError(f"{at}: {kind} takes integers, got {arg!r}")
    if not lo < hi:
        raise ConfigError(f"{at}: empty range [{lo}, {hi}] (need lo < hi)")
    if kind in ("loguniform", "qloguniform") and lo <= 0:
        raise ConfigError(f"{at}: {kind} needs 0 < lo, got {lo}")
    if n == 3 and not arg[2] > 0:
        raise ConfigError(f"{at}: the step q must be positive, got {arg[2]}")
    if kind == "qrandint" and math.floor(hi / arg[2]) * arg[2] < lo:
        raise ConfigError(f"{at}: no multiple of {arg[2]} in [{lo}, {hi}]")
    return Param(name, kind, tuple(arg))


def check_key(key: Any, at: str, keys: set[str]) -> None:
    if isinstance(key, str) and key in keys:
        return
    if isinstance(key, str) and key.startswith("data."):
        raise ConfigError(f"{at}.{key}: data settings cannot be swept (every trial is scored against the same data)")
    close = closest(str(key), keys)
    hint = f"; did you mean {close}?" if close else ""
    raise ConfigError(f"{at}.{key}: unknown config key{hint} (keys are flat, e.g. reverse.depth or reverse_loss.align)")


def load_space(path: str | Path, base: dict[str, Any] | None = None) -> Space:
    """Load and validate a space file; with `base` (raw pipeline data) also every value a trial can take."""
    path = Path(path)
    where = str(path)
    raw = read_yaml_mapping(path, "space file")
    raw = {k: ({} if v is None and k in ("fixed", "evaluate", "scheduler", "params") else v) for k, v in raw.items()}
    spec = validate(SpaceFile, raw, where)
    keys = sweepable_keys()
    if not isinstance(spec.params, dict) or not spec.params:
        raise ConfigError(f"{path}: params: empty (give at least one axis)")
    params = [parse_param(str(name), dist, where, keys) for name, dist in spec.params.items()]
    _check_overlaps(params, spec, where, keys)
    _check_scheduler(spec, where)
    space = Space(path, spec, params, raw)
    _check_table(space, where)
    if base is not None:
        check_values(space, base)
    return space


def _check_overlaps(params: list[Param], spec: SpaceFile, where: str, keys: set[str]) -> None:
    owner: dict[str, str] = {}
    for key in spec.fixed:
        check_key(key, f"{where}: fixed", keys)
        owner[key] = "fixed"
    if spec.steps is not None:
        if "train_reverse.steps" in owner:
            raise ConfigError(f"{where}: train_reverse.steps is set twice (steps and fixed); keep one")
        owner["train_reverse.steps"] = "steps"
    for key in spec.evaluate:
        owner[SWEEPABLE_EVALUATE + key] = "evaluate"
    for p in params:
        for key in p.keys:
            if key in owner:
                raise ConfigError(f"{where}: params.{p.name}: {key} is also set by {owner[key]}; "
                                  "an axis and another setting cannot both own a key")
            owner[key] = f"params.{p.name}"
    for key in spec.evaluate:
        if key not in keys_of_evaluate():
            close = closest(key, keys_of_evaluate())
            raise ConfigError(f"{where}: evaluate.{key}: unknown pipeline.evaluate setting"
                              + (f"; did you mean {close}?" if close else ""))


def keys_of_evaluate() -> set[str]:
    from biflow.pipeline.spec import EvaluateSection

    return set(EvaluateSection.model_fields)


def _check_scheduler(spec: SpaceFile, where: str) -> None:
    s = spec.scheduler
    features = spec.evaluate.get("features")
    want = "inception" if spec.metric == "fid" else "evaluator"
    if features is not None and features != want:
        raise ConfigError(f"{where}: metric {spec.metric} needs evaluate.features={want}, the file says {features}")
    if s.type == "fifo":
        return
    grace = s.grace_period or 2 * spec.report_every
    if spec.steps is not None:
        max_t = s.max_t or spec.steps
        if grace > max_t:
            raise ConfigError(f"{where}: scheduler.grace_period {grace} exceeds the trials' {max_t} steps: nothing could stop early")
    if grace < spec.report_every:
        raise ConfigError(f"{where}: scheduler.grace_period {grace} is shorter than report_every {spec.report_every}: "
                          "the scheduler sees a trial only when it reports")


def _check_table(space: Space, where: str) -> None:
    table = space.spec.table
    if table is None:
        return
    axis = next((p for p in space.params if p.name == table.axis), None)
    if axis is None or axis.cases is None:
        raise ConfigError(f"{where}: table.axis {table.axis!r} must name a `cases` axis of params")
    for i, row in enumerate(table.rows):
        if row.case != EXACT_CASE and row.case not in axis.cases:
            raise ConfigError(f"{where}: table.rows[{i}].case {row.case!r} is not a case of {table.axis} "
                              f"({', '.join(axis.cases)}) nor {EXACT_CASE!r}")


def check_values(space: Space, base: dict[str, Any]) -> None:
    """Every value each axis can take gives a valid trial config; discrete axes also in every combination."""
    where = str(space.path)
    first = {p.name: p.probe_values()[0] for p in space.params}
    for p in space.params:  # each axis alone (the others at the pipeline's values)
        for v in p.probe_values():
            try:
                space.trial_config(base, {p.name: v}, "trial")
            except ConfigError as err:
                what = f"case {v!r}" if p.cases is not None else f"value {v!r}"
                raise ConfigError(f"{where}: params.{p.name}: {what} gives an invalid trial: "
                                  f"{str(err).removeprefix('trial: ')}") from None
    discrete = [p for p in space.params if p.is_discrete and len(p.values) > 1]
    if math.prod(len(p.values) for p in discrete) > MAX_COMBINATIONS:
        discrete = []  # too many to enumerate: the first value of every axis together, below
    if not discrete:
        try:
            space.trial_config(base, first, "trial")
        except ConfigError as err:
            raise ConfigError(f"{where}: the first value of every axis together gives an invalid trial: "
                              f"{str(err).removeprefix('trial: ')}") from None
    else:
        for combo in itertools.product(*(p.values for p in discrete)):
            values = {**first, **{p.name: v for p, v in zip(discrete, combo)}}
            try:
                space.trial_config(base, values, "trial")
            except ConfigError as err:
                shown = ", ".join(f"{p.name}={v!r}" for p, v in zip(discrete, combo))
                raise ConfigError(f"{where}: the combination {shown} gives an invalid trial: "
                                  f"{str(err).removeprefix('trial: ')}") from None
