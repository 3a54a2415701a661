"""A sweep's run directories: `<storage>/_sweeps/<space>-<hash>/run-<n>/` with its state file (sweep.json) and the
lock its driver holds; a run whose state says running but whose lock is free lost its driver, and is closed."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from biflow.pipeline.cache import Storage
from biflow.pipeline.tracking import RunRef, StepRun, Tracker
from biflow.sweep.report import write_text
from biflow.sweep.results import end_open_trials

STATE = "sweep.json"


def sweeps_root(storage: Storage) -> Path:
    return (Path(storage.root) if storage.is_local else storage.local_dir) / "_sweeps"


def runs_of(sweep_dir: Path) -> list[Path]:
    runs = [p for p in sweep_dir.glob("run-*") if (p / STATE).is_file() and p.name[4:].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[4:]))


def read_state(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE).read_text())


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_text(run_dir / STATE, json.dumps(state, indent=1, sort_keys=True, default=str) + "\n")


def hold(run_dir: Path):
    """An exclusive flock on the run directory while this process drives it (None: another process holds it)."""
    import fcntl

    fh = open(run_dir / "sweep.lock", "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def close_if_dead(run_dir: Path, tracker: Tracker) -> None:
    """A run whose state says running but whose lock is free lost its driver: end its MLflow runs KILLED."""
    try:
        state = read_state(run_dir)
    except (OSError, ValueError):
        return
    if state.get("status") != "running":
        return
    lock = hold(run_dir)
    if lock is None:  # alive in another process
        return
    try:
        parent = StepRun(RunRef(tracker.uri, tracker.experiment_id, state["parent_run_id"]))
        end_open_trials(parent, "interrupted")
        if parent.client.get_run(parent.run_id).info.status == "RUNNING":
            parent.set_tags({"biflow.sweep.state": "driver died; resumable with --resume"})
            parent.client.set_terminated(parent.run_id, "KILLED")
        write_state(run_dir, {**state, "status": "interrupted", "updated": time.time()})
    except Exception:  # noqa: BLE001 - a store we cannot reach or a deleted run: nothing to close
        pass
    finally:
        lock.close()
