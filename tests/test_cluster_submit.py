"""`biflow submit` and biflow.cluster without a cluster: token lookup, addresses, runtime environments, the
multi-node storage and tracking checks, and the one-line errors a user meets first (a fake dashboard on loopback
stands in for the head where an HTTP answer is needed; tests/test_cluster.py does it all against real Ray).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from biflow.cli import main
from biflow.cluster import auth, jobs, storage
from biflow.cluster.dashboard import ClusterError, Dashboard, resolve_address
from tests.support.processes import free_port
from biflow.commands.submit import job_command
from biflow.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "pipelines/digits.yaml"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biflow submit: error: "), err
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No Ray/MLflow settings of this machine leak in; HOME has no ~/.ray/auth_token."""
    import os

    for key in list(os.environ):
        if key.startswith(("RAY_", "MLFLOW_")) or key in ("BIFLOW_SHARED_STORAGE", "BIFLOW_STORAGE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    return tmp_path


# ------------------------------------------------------------------------ token
def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default-file\n")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path-file")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert auth.find_token("explicit", env) == auth.Token("explicit", "--token")
    assert auth.find_token(None, env).value == "from-env"
    assert auth.find_token(None, {**env, "RAY_AUTH_TOKEN": ""}).value == "from-path-file"
    assert auth.find_token(None, {"HOME": str(home)}) == auth.Token("from-default-file", str(home / ".ray" / "auth_token"))
    assert auth.find_token(None, {"HOME": str(tmp_path)}) is None
    assert auth.find_token(None, {**env, "RAY_AUTH_MODE": "disabled"}) is None  # nothing sent to an auth-less cluster
    assert auth.find_token("explicit", {"RAY_AUTH_MODE": "disabled"}).value == "explicit"
    assert auth.headers(auth.Token("t0k", "x")) == {"Authorization": "Bearer t0k"} and auth.headers(None) == {}
    assert "t0k" not in repr(auth.Token("t0k", "x"))


def test_a_token_path_that_does_not_exist_is_an_error_not_a_silent_fallback(tmp_path):
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        auth.find_token(None, {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        auth.find_token(None, {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


# -------------------------------------------------------------------- addresses
def test_dashboard_addresses():
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address("head:8265", {}) == "http://head:8265"
    assert resolve_address("https://ray.example.org/", {}) == "https://ray.example.org"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}) == "http://a:1"
    assert resolve_address(None, {"RAY_ADDRESS": "http://b:2"}) == "http://b:2"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "http://127.0.0.1:8265"  # a GCS address is not it
    with pytest.raises(ClusterError, match="Ray Client address"):
        resolve_address("ray://head:10001", {})


# ------------------------------------------------------------- runtime environment
def test_the_runtime_env_uploads_the_code_without_environments_and_results(tmp_path):
    env = jobs.runtime_env(tmp_path, None, {"A": "1"}, ["data/"])
    assert env["working_dir"] == str(tmp_path.resolve())
    for pattern in (".venv", ".git", "runs", "mlruns", "*.egg-info", ".env", "data/"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "1"}
    image = jobs.runtime_env(None, "biflow:gpu", {})
    assert image == {"env_vars": {"PYTHONUNBUFFERED": "1"}, "image_uri": "biflow:gpu"}
    with pytest.raises(UserError, match="not both"):
        jobs.runtime_env(tmp_path, "biflow:gpu")
    with pytest.raises(UserError, match="not a directory"):
        jobs.runtime_env(tmp_path / "nope")


def test_env_items(monkeypatch):
    monkeypatch.setenv("FROM_SHELL", "yes")
    assert jobs.parse_env(["A=1", "B=x=y", "FROM_SHELL"]) == {"A": "1", "B": "x=y", "FROM_SHELL": "yes"}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        jobs.parse_env(["=1"])
    monkeypatch.delenv("FROM_SHELL")
    with pytest.raises(UserError, match="not set in this shell"):
        jobs.parse_env(["FROM_SHELL"])


def test_storage_and_tracking_become_overrides_of_the_pipeline_commands_only():
    assert job_command(["run", DIGITS], "s3://b/x", "http://mlflow:5000") == [
        "run", DIGITS, "--set", "pipeline.storage=s3://b/x", "--set", "pipeline.tracking_uri=http://mlflow:5000"]
    assert job_command(["status", DIGITS], "/nfs/x", None) == ["status", DIGITS, "--set", "pipeline.storage=/nfs/x"]
    assert job_command(["sweep", "tune_spaces/x.yaml", "--pipeline", DIGITS], "s3://b/x", None) == [
        "sweep", "tune_spaces/x.yaml", "--pipeline", DIGITS, "--set", "pipeline.storage=s3://b/x"]
    assert job_command(["train", "--out", "/nfs/x"], "/nfs/x", "http://m:5000") == ["train", "--out", "/nfs/x"]
    with pytest.raises(UserError, match="not a biflow command"):
        job_command(["python", "train.py"], None, None)
    with pytest.raises(UserError, match="cannot be `submit`"):
        job_command(["submit", "--list"], None, None)


def test_a_job_exits_with_its_drivers_code():
    def info(status, code=None, message=""):
        return SimpleNamespace(status=SimpleNamespace(value=status), driver_exit_code=code, message=message,
                               start_time=1000, end_time=61000)

    assert jobs.outcome(info("SUCCEEDED", 0)).exit_code == 0
    assert jobs.outcome(info("FAILED", 2, "Job entrypoint command failed with exit code 2")).exit_code == 2
    assert jobs.outcome(info("FAILED", None)).exit_code == 1
    assert jobs.outcome(info("STOPPED")).exit_code == 1
    assert jobs.outcome(info("SUCCEEDED", 0)).seconds == 60.0


# ------------------------------------------------------------ storage checks
MOUNTS = """\
overlay / overlay rw 0 0
tmpfs /tmp tmpfs rw 0 0
server:/export /mnt/shared nfs4 rw 0 0
/dev/sdb1 /mnt/shared/local ext4 rw 0 0
fuse /mnt/gcs fuse.gcsfuse rw 0 0
/dev/sdc1 /mnt/with\\040space ext4 rw 0 0
"""


def test_the_filesystem_of_a_path_is_its_deepest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert storage.filesystem_type("/mnt/shared/biflow/cache", mounts) == "nfs4"
    assert storage.filesystem_type("/mnt/shared/local/x", mounts) == "ext4"
    assert storage.filesystem_type("/mnt/sharedX/y", mounts) == "overlay"  # a prefix is not a parent
    assert storage.filesystem_type("/mnt/with space/y", mounts) == "ext4"
    assert storage.filesystem_type("/tmp/a/b/not/there/yet", mounts) == "tmpfs"  # nearest existing ancestor


def test_what_counts_as_shared_storage(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "filesystem_type", lambda p, mounts="": "nfs4" if str(p).startswith("/mnt/") else "ext4")
    assert storage.shared_reason("s3://bucket/biflow", {}) == "s3:// URI"
    assert storage.shared_reason("gs://bucket/x", {}) == "gs:// URI"
    assert storage.shared_reason("/mnt/shared/x", {}) == "nfs4 mount"
    assert storage.shared_reason("/mnt/shared/x", {}, detect_mounts=False) is None  # the laptop cannot tell
    assert storage.shared_reason("/data/x", {}) is None
    assert storage.shared_reason("file:///mnt/shared/x", {}) == "nfs4 mount"
    assert storage.shared_reason("/data/x", {"BIFLOW_SHARED_STORAGE": "1"}) == "BIFLOW_SHARED_STORAGE=1"
    assert storage.shared_reason("/data/x", {"BIFLOW_SHARED_STORAGE": "0"}) is None


def test_node_local_storage_on_several_nodes_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(storage, "filesystem_type", lambda p, mounts="": "ext4")
    storage.check_shared_storage("/data/biflow", 1, {})  # one node: any local path is fine
    storage.check_shared_storage("s3://b/biflow", 8, {})
    storage.check_shared_storage("/data/biflow", 8, {}, shared=True)  # declared in the config
    with pytest.raises(storage.SharedStorageError) as err:
        storage.check_shared_storage("/data/biflow", 3, {})
    msg = str(err.value)
    assert "\n" not in msg and "pipeline.storage /data/biflow is a node-local path (ext4 filesystem)" in msg
    assert "3 nodes" in msg and "s3://" in msg and "BIFLOW_SHARED_STORAGE=1" in msg


def test_tracking_stores_on_clusters(monkeypatch):
    monkeypatch.setattr(storage, "filesystem_type", lambda p, mounts="": "ext4")
    storage.check_tracking_uri("http://mlflow:5000", 8, {})
    storage.check_tracking_uri("sqlite:////data/mlflow.db", 1, {})
    storage.check_tracking_uri("postgresql://u@db/mlflow", 4, {})
    with pytest.raises(storage.SharedStorageError, match="sqlite file on one node but the Ray cluster has 2 nodes"):
        storage.check_tracking_uri("sqlite:////data/mlflow.db", 2, {})
    storage.check_tracking_uri("sqlite:////data/mlflow.db", 2, {"BIFLOW_SHARED_STORAGE": "1"})
    with pytest.raises(storage.SharedStorageError, match="is relative"):
        storage.check_tracking_uri("sqlite:///mlflow.db", 1, {})
    with pytest.raises(storage.SharedStorageError, match="file store"):
        storage.check_tracking_uri("mlruns", 1, {})


def test_check_cluster_counts_the_nodes_of_the_connected_ray(monkeypatch):
    monkeypatch.setattr(storage, "alive_nodes", lambda: 2)
    monkeypatch.setattr(storage, "filesystem_type", lambda p, mounts="": "xfs")
    with pytest.raises(storage.SharedStorageError, match="2 nodes"):
        storage.check_cluster("/data/biflow", "http://mlflow:5000", env={})
    assert storage.check_cluster("s3://b/x", "http://mlflow:5000", env={}) == 2
    with pytest.raises(storage.SharedStorageError, match="sqlite"):
        storage.check_cluster("s3://b/x", "sqlite:////data/mlflow.db", env={})


# ---------------------------------------------------------- a fake dashboard
class FakeHead:
    """An HTTP server on 127.0.0.1 answering like a token-protected Ray dashboard with `nodes` alive nodes."""

    def __init__(self, token: str | None = "right", nodes: int = 2):
        head = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                head.requests.append(self.path)
                sent = self.headers.get("Authorization")
                if head.token and not sent:
                    return self._send(401, b"Unauthorized: Missing authentication token")
                if head.token and sent != f"Bearer {head.token}":
                    return self._send(403, b"Forbidden: Invalid authentication token")
                if self.path.startswith("/api/version"):
                    return self._send(200, json.dumps({"ray_version": "2.60.0", "version": "4"}).encode())
                if self.path.startswith("/api/v0/nodes"):
                    rows = [{"node_id": f"n{i}", "node_ip": f"10.0.0.{i}", "state": "ALIVE"} for i in range(head.nodes)]
                    rows.append({"node_id": "gone", "node_ip": "10.0.0.99", "state": "DEAD"})
                    return self._send(200, json.dumps({"data": {"result": {"result": rows}}}).encode())
                return self._send(404, b"not found")

            def _send(self, code, body):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body)

        self.token, self.nodes, self.requests = token, nodes, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_head():
    heads = []

    def make(**kw):
        heads.append(FakeHead(**kw))
        return heads[-1]

    yield make
    for h in heads:
        h.close()


def test_the_dashboard_client_turns_http_failures_into_one_line(fake_head):
    head = fake_head()
    assert Dashboard(head.address, auth.Token("right", "x")).check()["ray_version"] == "2.60.0"
    assert [n["node_id"] for n in Dashboard(head.address, auth.Token("right", "x")).nodes()] == ["n0", "n1"]
    with pytest.raises(ClusterError, match="requires an auth token .*RAY_AUTH_TOKEN.*ray get-auth-token"):
        Dashboard(head.address, None).check()
    with pytest.raises(ClusterError, match="rejected the auth token from /some/file"):
        Dashboard(head.address, auth.Token("wrong", "/some/file")).check()
    with pytest.raises(ClusterError, match="unreachable"):
        Dashboard(f"http://127.0.0.1:{free_port()}", None, timeout=3).check()


def test_submit_without_a_command_or_with_two_things_to_do(clean_env, capsys):
    code, _, err = run_cli(capsys, "submit")
    assert code == 2 and "nothing to submit" in one_line(err)
    code, _, err = run_cli(capsys, "submit", "--status", "raysubmit_x", "--", "run", DIGITS)
    assert code == 2 and "not both" in one_line(err)
    code, _, err = run_cli(capsys, "submit", "--", "python", "x.py")
    assert code == 2 and "not a biflow command" in one_line(err)


def test_submit_to_a_head_that_is_not_there(clean_env, capsys):
    code, _, err = run_cli(capsys, "submit", "--address", f"127.0.0.1:{free_port()}", "--list")
    assert code == 2 and "is unreachable" in one_line(err)


def test_submit_checks_the_pipeline_before_contacting_the_cluster(clean_env, capsys, fake_head):
    head = fake_head()
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--", "run", DIGITS, "--set", "train_forward.stepz=3")
    assert code == 2 and "stepz" in one_line(err)
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--", "run", DIGITS)
    assert code == 2 and "pipeline.storage runs/pipeline is relative" in one_line(err)
    outside = clean_env / "x.yaml"
    outside.write_text((ROOT / DIGITS).read_text())
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--storage", "s3://b/x", "--", "run", str(outside))
    assert code == 2 and "is outside --working-dir" in one_line(err)
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--", "run", DIGITS, "--bogus")
    assert code == 2 and "is invalid" in err.strip().splitlines()[-1]
    assert head.requests == []  # all of it decided here


class FakeJobs:
    """Stands in for ray.job_submission.JobSubmissionClient: records what would be submitted."""

    def __init__(self):
        self.submitted = []

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return "raysubmit_fake"


@pytest.fixture
def fake_jobs(monkeypatch):
    fake = FakeJobs()
    monkeypatch.setattr(Dashboard, "jobs", property(lambda self: fake))
    return fake


def test_submit_refuses_node_local_storage_on_a_multi_node_cluster(clean_env, capsys, fake_head, fake_jobs, monkeypatch):
    head = fake_head(nodes=2)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "right")
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--storage", "/data/biflow", "--", "run", DIGITS)
    line = one_line(err)
    assert code == 2 and "pipeline.storage /data/biflow is a node-local path but the Ray cluster has 2 nodes" in line
    code, _, err = run_cli(capsys, "submit", "--address", head.address, "--storage", "s3://b/x",
                           "--tracking-uri", "sqlite:////data/mlflow.db", "--", "run", DIGITS)
    assert code == 2 and "sqlite file on one node but the Ray cluster has 2 nodes" in one_line(err)
    assert fake_jobs.submitted == []
    single = fake_head(nodes=1)
    code, out, err = run_cli(capsys, "submit", "--address", single.address, "--storage", "/data/biflow", "--no-wait",
                             "--", "run", DIGITS)
    assert code == 0 and "(1 node)" in out and len(fake_jobs.submitted) == 1  # one node: a local path is fine


def test_what_a_submitted_job_gets(clean_env, capsys, fake_head, fake_jobs, monkeypatch):
    head = fake_head(nodes=3)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "right")
    code, out, err = run_cli(capsys, "submit", "--address", head.address, "--storage", "/nfs/biflow", "--shared-storage",
                             "--tracking-uri", "http://mlflow:5000", "--env", "EXTRA=1", "--exclude", "big/",
                             "--job-id", "my-run-1", "--no-wait", "--", "run", DIGITS, "--set", "train_forward.steps=5")
    assert code == 0, err
    job = fake_jobs.submitted[0]
    assert job["entrypoint"] == (f"biflow run {DIGITS} --set train_forward.steps=5 --set pipeline.storage=/nfs/biflow "
                                 "--set pipeline.tracking_uri=http://mlflow:5000")
    env = job["runtime_env"]
    assert env["working_dir"] == str(ROOT) and {".venv", ".git", "runs", "mlruns", "big/"} <= set(env["excludes"])
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "EXTRA": "1", "BIFLOW_STORAGE": "/nfs/biflow",
                               "MLFLOW_TRACKING_URI": "http://mlflow:5000", "BIFLOW_SHARED_STORAGE": "1"}
    assert "RAY_AUTH_TOKEN" not in json.dumps(job) and "right" not in json.dumps(job)  # the token never rides along
    assert job["submission_id"] == "my-run-1" and job["metadata"]["biflow_command"] == "run"
    assert "storage /nfs/biflow (3 nodes); MLflow http://mlflow:5000" in out
    assert "job raysubmit_fake submitted" in out and "--follow raysubmit_fake" in out
    code, out, err = run_cli(capsys, "submit", "--address", head.address, "--image", "biflow:gpu", "--no-wait",
                             "--storage", "s3://b/x", "--", "status", DIGITS)
    env = fake_jobs.submitted[1]["runtime_env"]
    assert code == 0 and env["image_uri"] == "biflow:gpu" and "working_dir" not in env
