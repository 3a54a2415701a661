"""Ports, process groups and HTTP readiness for tests/support/local_cluster.py.

Everything here acts on processes by id (a node's process group and its descendants), never by name, so
several loopback clusters and other people's Ray instances on the same machine are left alone.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from biflow.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(size: int, host: str = "127.0.0.1", lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """`size` consecutive ports that are free right now (Ray's worker processes take one each)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(lo, hi - size)
        ok = True
        for port in range(start, start + size):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + size - 1
    raise UserError(f"no {size} consecutive free ports between {lo} and {hi}")


@dataclass
class Node:
    """One `ray start --block` process group of a LocalCluster."""

    name: str
    ip: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def processes(self):
        """psutil.Process of this node: `ray start` and everything under it (raylet, GCS, workers, agents)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def raylet_pid(self) -> int | None:
        return next((p.pid for p in self.processes() if _name(p) == "raylet"), None)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - gone meanwhile
        return ""


def wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    """Until `url` answers; a one-line error with the log's tail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode} while starting; last lines of {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise UserError(f"{what} did not answer {url} within {timeout:.0f} s; last lines of {log}:\n{tail(log)}")


def tail(path: Path, n: int = 15) -> str:
    """The last `n` lines of a log file (or a note that there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_gone(procs, timeout: float) -> bool:
    """True once none of the psutil processes runs any more (zombies count as gone); False on timeout."""
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _running(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:  # noqa: BLE001
        return False


def stop_group(node: Node, grace: float = 5.0) -> None:
    """SIGTERM the node's process group, then SIGKILL it and every process it started (by pid, never by name)."""
    procs = node.processes()
    signal_group(node.pid, signal.SIGTERM)
    if not wait_gone(procs, grace):
        signal_group(node.pid, signal.SIGKILL)
        for p in procs:  # workers that left the process group
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        wait_gone(procs, 5.0)
    try:
        node.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a started server's process group, SIGKILL it if it has not exited within `timeout`."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
