"""A real multi-node Ray cluster and an MLflow tracking server on this machine, on loopback addresses only.

For the cluster tests and for trying `biflow submit` without Docker:

    python -m tests.support.local_cluster --workers 1   # from the repository root; prints the dashboard,
                                                        # MLflow and the token; Ctrl-C tears everything down

Each node is its own `ray start --block` process group with its own temp dir and ports, so several
such clusters (and other people's `ray.init()` clusters) coexist, and tearing one down kills exactly
its own processes (never `ray stop`, which is global). Nodes get distinct loopback addresses
(head 127.0.0.2, workers 127.0.0.3, ...): Ray replaces 127.0.0.1 by the machine's outward address,
but not the rest of 127.0.0.0/8, so nothing leaves the loopback interface and the nodes look like
separate machines to Ray (node IPs, placement). The dashboard and MLflow listen on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from biflow.errors import UserError

from .processes import Node, free_port, free_port_range, stop_group, stop_process_group, tail, wait_http

BIN = Path(sys.executable).parent  # ray, mlflow and biflow of this environment
HEAD_IP = "127.0.0.2"


class LocalCluster:
    """Head + worker nodes (+ an MLflow server); `start()`, `add_worker()`, `kill_raylet()`, `stop()`.

    root: where logs, the MLflow database and its artifacts go. Ray's own temp dirs go to a short
    /tmp/bfc-* directory (Ray's unix socket paths must stay under 107 characters).
    token: the cluster's auth token (RAY_AUTH_MODE=token); None: authentication disabled.
    """

    def __init__(self, root: str | Path, token: str | None = "generate", head_cpus: float = 1,
                 head_resources: dict[str, float] | None = None, mlflow: bool = True, env: dict[str, str] | None = None,
                 object_store_mb: int = 256):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16) if token == "generate" else token
        self.head_cpus, self.head_resources = head_cpus, dict(head_resources or {})
        self.object_store_mb = object_store_mb
        self.want_mlflow = mlflow
        self.extra_env = dict(env or {})
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="bfc-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.mlflow_port = free_port() if mlflow else None
        self.nodes: list[Node] = []
        self.mlflow_proc: subprocess.Popen | None = None
        self._next_ip = 3

    # ---------------------------------------------------------------- addresses
    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def tracking_uri(self) -> str | None:
        return f"http://127.0.0.1:{self.mlflow_port}" if self.mlflow_port else None

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "mlartifacts"

    def env(self) -> dict[str, str]:
        """Environment of the Ray processes (and so of jobs): this venv first on PATH, the token, quiet usage stats."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of another Ray leaks in
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray's state API inside workers (Ray Train's placement-group cleaner) finds "the" cluster by scanning this
        # machine's processes, and refuses when it sees several (other people's ray.init() clusters): point it here.
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard
        if self.token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
            env.pop("RAY_AUTH_TOKEN", None)
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ starting
    def start(self, workers: list[dict] = (), timeout: float = 240, attempts: int = 3) -> LocalCluster:
        """Start MLflow (in parallel), the head, then the workers: [{"cpus": 1, "resources": {"node2": 1}}, ...].

        A node whose `ray start` gives up is started again (up to `attempts` times): Ray allows a raylet 30 s
        to register, which a machine under heavy load can miss.
        """
        try:
            if self.want_mlflow:
                self._start_mlflow()
            for attempt in range(attempts):
                head = self._start_node(head=True, cpus=self.head_cpus, resources=self.head_resources)
                try:
                    wait_http(f"{self.dashboard}/api/gcs_healthz", timeout, head.proc, "the Ray head", head.log)
                    break
                except UserError:
                    if head.proc.poll() is None or attempt == attempts - 1:
                        raise
                    self.stop_node(head)
                    self.nodes.remove(head)
                    self.gcs_port, self.dashboard_port = free_port(), free_port()
            specs = [(w.get("cpus", 1), dict(w.get("resources", {}))) for w in workers]
            started = [self.add_worker(cpus, res, wait=False) for cpus, res in specs]
            deadline = time.monotonic() + timeout
            retries = [attempts - 1] * len(specs)
            while len(self._alive_nodes()) < 1 + len(specs):
                for i, node in enumerate(started):
                    if node.proc.poll() is not None and retries[i] > 0:  # gave up while starting: once more
                        self.stop_node(node)
                        self.nodes.remove(node)
                        started[i] = self._start_node(head=False, cpus=specs[i][0], resources=specs[i][1], ip=node.ip)
                        retries[i] -= 1
                if time.monotonic() > deadline:
                    logs = "\n".join(f"--- {n.log}\n{tail(n.log, 8)}" for n in self.nodes)
                    raise UserError(f"{len(self._alive_nodes())} of {1 + len(specs)} Ray nodes alive after {timeout:.0f} s\n{logs}")
                time.sleep(1)
            if self.mlflow_proc is not None:
                wait_http(f"{self.tracking_uri}/health", timeout, self.mlflow_proc, "the MLflow server", self.root / "mlflow.log")
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def _alive_nodes(self) -> list[dict]:
        try:
            return self.api().nodes()
        except UserError:
            return []

    def _ray_ports(self, head: bool) -> list[str]:
        lo, hi = free_port_range(60)
        args = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}"]
        if head:
            args += [f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}"]
        return args

    def _start_node(self, head: bool, cpus: float, resources: dict[str, float], ip: str | None = None) -> Node:
        if ip is None:
            ip = HEAD_IP if head else f"127.0.0.{self._next_ip}"
            if not head:
                self._next_ip += 1
        name = "head" if head else f"worker{int(ip.rsplit('.', 1)[1]) - 2}"  # 127.0.0.3 is worker1
        temp = self.ray_tmp / name
        temp.mkdir(parents=True, exist_ok=True)
        log = self.root / f"ray-{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={int(cpus)}", "--num-gpus=0",
               f"--temp-dir={temp}", f"--object-store-memory={self.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
               *self._ray_ports(head)]
        cmd += ["--head", "--include-dashboard=true"] if head else [f"--address={self.gcs_address}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.root)
        node = Node(name, ip, proc, temp, log, dict(resources))
        self.nodes.append(node)
        return node

    def add_worker(self, cpus: float = 1, resources: dict[str, float] | None = None, wait: bool = True,
                   timeout: float = 180) -> Node:
        node = self._start_node(head=False, cpus=cpus, resources=dict(resources or {}))
        if wait:
            self.wait_for_nodes(sum(1 for n in self.nodes if n.proc.poll() is None), timeout)
        return node

    def _start_mlflow(self) -> None:
        log = self.root / "mlflow.log"
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.artifacts_dir), "--host", "127.0.0.1", "--port", str(self.mlflow_port),
               "--workers", "1"]
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        with open(log, "ab") as fh:
            self.mlflow_proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, cwd=self.root)

    def api(self):
        from biflow.cluster import auth
        from biflow.cluster.dashboard import Dashboard

        return Dashboard(self.dashboard, auth.Token(self.token, "LocalCluster") if self.token else None)

    def wait_for_nodes(self, count: int, timeout: float = 180) -> list[dict]:
        """Until `count` nodes are alive; returns the dashboard's node list."""
        deadline = time.monotonic() + timeout
        while len(alive := self._alive_nodes()) < count:
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.log}\n{tail(n.log, 8)}" for n in self.nodes)
                raise UserError(f"{len(alive)} of {count} Ray nodes alive after {timeout:.0f} s\n{logs}")
            time.sleep(1)
        return alive

    # -------------------------------------------------------------------- faults
    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet (as a crashed machine or an OOM-killed raylet would die); returns its pid."""
        pid = node.raylet_pid()
        if pid is None:
            raise UserError(f"{node.name}: no raylet process found")
        os.kill(pid, signal.SIGKILL)
        return pid

    # ------------------------------------------------------------------ teardown
    def stop_node(self, node: Node, grace: float = 5.0) -> None:
        """SIGTERM the node's process group, then SIGKILL it and every process it started (by pid, never by name)."""
        stop_group(node, grace)

    def stop(self, keep_logs: bool = False) -> None:
        """Kill every process this cluster started; keep_logs: copy Ray's logs to <root>/ray-logs/ first."""
        for node in reversed(self.nodes):
            self.stop_node(node)
        if keep_logs:
            for node in self.nodes:
                for logs in node.temp_dir.glob("session_*/logs"):
                    shutil.copytree(logs, self.root / "ray-logs" / node.name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.sock", "events"))
        if self.mlflow_proc is not None:
            stop_process_group(self.mlflow_proc)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ray_start_works(timeout: float = 60) -> str | None:
    """None when `ray start` can run here, else why not (for a test skip reason)."""
    ray = BIN / "ray"
    if not ray.is_file():
        return f"{ray} is not installed"
    try:
        out = subprocess.run([str(ray), "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ray --version` failed: {err}"
    if out.returncode != 0:
        return f"`ray --version` exited {out.returncode}: {out.stderr.strip()[:200]}"
    try:
        with socket.socket() as s:
            s.bind((HEAD_IP, 0))
    except OSError as err:
        return f"cannot bind {HEAD_IP} (loopback range): {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.support.local_cluster", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="logs, MLflow database and artifacts (default: a new temp dir)")
    p.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    p.add_argument("--cpus", type=int, default=1, help="CPUs of each node")
    p.add_argument("--no-auth", action="store_true", help="start with RAY_AUTH_MODE=disabled")
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow server")
    args = p.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="biflow-cluster-"))
    cluster = LocalCluster(root, token=None if args.no_auth else "generate", head_cpus=args.cpus, mlflow=not args.no_mlflow)
    print(f"starting a head and {args.workers} worker(s) under {root} ...", flush=True)
    cluster.start([{"cpus": args.cpus, "resources": {f"node{i + 2}": 1}} for i in range(args.workers)])
    print(f"Ray dashboard   {cluster.dashboard}\nRay GCS         {cluster.gcs_address}")
    if cluster.tracking_uri:
        print(f"MLflow          {cluster.tracking_uri}  (artifacts in {cluster.artifacts_dir})")
    if cluster.token:
        print(f"auth token      export RAY_AUTH_TOKEN={cluster.token}")
    print(f"try:            biflow submit --address {cluster.dashboard} --shared-storage "
          f"--storage {root / 'storage'} -- run pipelines/digits.yaml\nCtrl-C tears everything down.", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
