"""The steps before stage 2 (prepare, train_forward), resolved through the pipeline's step cache.

A sweep never trains a forward flow twice: the step key of `train_forward` depends only on the
forward sections, so every trial that leaves them alone finds the flow the driver resolved (or an
earlier `biflow run` trained), and trials that change them compute their own key and either find
it cached or train it once under the step's lock (a concurrent trial with the same key waits, then
reads the record). The work is the pipeline's own `execute_step`: same outputs, same done records,
same MLflow child runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from biflow.pipeline.cache import Storage
from biflow.pipeline.runner import Planned, execute_step, plan
from biflow.pipeline.spec import PipelineConfig
from biflow.pipeline.context import StepContext
from biflow.pipeline.steps import STEPS
from biflow.pipeline.tracking import RunRef

UPSTREAM = ("prepare", "train_forward")


def upstream_plan(cfg: PipelineConfig, storage: Storage, upto: str = "train_forward") -> list[Planned]:
    """The planned steps up to and including `upto` (keys and cached records)."""
    steps = plan(cfg, storage)
    names = UPSTREAM[: UPSTREAM.index(upto) + 1]
    return [p for p in steps if p.name in names]


def resolve_upstream(cfg: PipelineConfig, storage: Storage, parent: RunRef | None, *, upto: str = "train_forward",
                     remote: bool = False, echo=print) -> dict[str, dict[str, Any]]:
    """Done records of the upstream steps of `cfg`, running the missing ones now.

    remote: run each missing step as a Ray task with the step's own resources (the driver does this);
    else in this process (a trial already holds its CPUs: a nested task could wait forever for one).
    """
    records: dict[str, dict[str, Any]] = {}
    for p in upstream_plan(cfg, storage, upto):
        if p.record is not None:
            records[p.name] = p.record
            continue
        echo(f"[sweep] {p.name}: not cached (key {p.key}), running it")
        payload = p.payload(cfg, storage, parent)
        inputs = [{"record": records[i]} for i in p.inputs]
        if remote:
            import ray

            task = ray.remote(execute_step).options(name=f"biflow:{p.name}", max_retries=0, **STEPS[p.name].resources(cfg))
            ref = task.remote(payload, *inputs)
            while not ray.wait([ref], timeout=1.0)[0]:  # a timeout keeps Ctrl-C responsive
                pass
            out = ray.get(ref)
        else:
            out = execute_step(payload, *inputs)
        records[p.name] = out["record"]
    return records


def step_context(cfg: PipelineConfig, storage: Storage, records: dict[str, dict[str, Any]], work: Path) -> StepContext:
    """A StepContext over resolved upstream records, so the pipeline's helpers (data_dir, train_uri) apply."""
    return StepContext("train_reverse", "sweep", cfg, storage, records, None, work, work / "out")


def forward_checkpoint(ctx: StepContext) -> tuple[Path, str]:
    """(local path, storage URI) of the resolved forward flow."""
    name = ctx.inputs["train_forward"]["result"]["checkpoint"]
    return ctx.input_dir("train_forward") / name, ctx.input_uri("train_forward", name)
