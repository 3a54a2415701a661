"""A submitted job: its runtime environment, its logs followed to the end, its outcome as an exit code.

The job's driver is the biflow command itself (`biflow run pipelines/x.yaml ...`), started by Ray on
the head node. Its code comes either from an upload of the working directory (`working_dir`, the
default: the cluster runs exactly the code you have) or from a container image (`image_uri`: the
code baked into docker/Dockerfile's image); Ray does not allow both at once.
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from biflow.errors import UserError

# Never uploaded with the working directory: environments, caches, local results, VCS data.
DEFAULT_EXCLUDES = (".venv", "venv", ".git", "runs", "mlruns", "mlartifacts", "mlflow.db", "__pycache__", "*.egg-info",
                    ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.whl", ".env", "docker/.env")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def runtime_env(working_dir: str | Path | None = None, image: str | None = None, env_vars: dict[str, str] | None = None,
                excludes: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The job's runtime environment: code from `working_dir` (uploaded) or `image`, plus environment variables."""
    if working_dir is not None and image is not None:
        raise UserError("a job takes its code from an uploaded working directory or from a container image, not both "
                        "(Ray's image_uri runs alone): drop --working-dir or --image")
    env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}}
    if working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {working_dir}: not a directory")
        env["working_dir"] = str(wd)
        env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *excludes]))
    if image is not None:
        env["image_uri"] = image
    return env


def parse_env(items: list[str]) -> dict[str, str]:
    """KEY=VALUE strings (repeatable --env) -> dict; a bare KEY takes this shell's value."""
    import os

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise UserError(f"--env {key}: not set in this shell (use --env {key}=VALUE)")
            value = os.environ[key]
        out[key] = value
    return out


@dataclass
class Outcome:
    status: str  # SUCCEEDED | FAILED | STOPPED
    message: str
    exit_code: int  # what `biflow submit` exits with
    seconds: float | None


def outcome(info) -> Outcome:
    """Exit code of a finished job: 0 on success, the driver's own code on failure (1 when Ray has none)."""
    status = str(getattr(info.status, "value", info.status))
    code = getattr(info, "driver_exit_code", None)
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    if status == "SUCCEEDED":
        exit_code = 0
    elif status == "STOPPED":
        exit_code = 1
    else:
        exit_code = code if isinstance(code, int) and code > 0 else 1
    return Outcome(status, " ".join((info.message or "").split())[:300], exit_code, seconds)


async def _follow(client, job_id: str, out: TextIO, poll_s: float) -> None:
    """Stream the job's logs until the job ends; reconnect (skipping what was printed) if the stream drops early."""
    printed = 0
    while True:
        seen = 0
        try:
            async for chunk in client.tail_job_logs(job_id):
                if seen + len(chunk) > printed:
                    out.write(chunk[max(0, printed - seen):])
                    out.flush()
                    printed = seen + len(chunk)
                seen += len(chunk)
        except Exception as err:  # noqa: BLE001 - a dropped connection: ask for the status, maybe reconnect
            print(f"[biflow submit] log stream interrupted ({type(err).__name__}); reconnecting", file=sys.stderr, flush=True)
        status = str(getattr(client.get_job_status(job_id), "value", ""))
        if status in TERMINAL:
            return
        await asyncio.sleep(poll_s)


def follow(client, job_id: str, out: TextIO = sys.stdout, poll_s: float = 2.0) -> Outcome:
    """Print the job's logs as they come until it ends; its Outcome (the end status may trail the log by a moment)."""
    asyncio.run(_follow(client, job_id, out, poll_s))
    deadline = time.monotonic() + 30
    while True:
        info = client.get_job_info(job_id)
        if str(info.status.value) in TERMINAL or time.monotonic() > deadline:
            return outcome(info)
        time.sleep(0.5)


def describe(info) -> list[str]:
    """`biflow submit --status` lines for one job."""
    def when(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    lines = [f"job        {info.submission_id}", f"status     {info.status.value}",
             f"entrypoint {info.entrypoint}", f"started    {when(info.start_time)}", f"ended      {when(info.end_time)}"]
    if info.end_time and info.start_time:
        lines.append(f"took       {(info.end_time - info.start_time) / 1000:.1f} s")
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"exit code  {info.driver_exit_code}")
    if info.message:
        lines.append(f"message    {' '.join(info.message.split())[:300]}")
    return lines
