"""The Ray session of a pipeline or sweep: connect to a cluster or start a local Ray, and refuse settings the
local Ray cannot serve (a GPU task on a machine without one would wait forever)."""
from __future__ import annotations

import socket

from biflow.errors import UserError
from biflow.pipeline.spec import PipelineConfig


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which machine of the cluster ran a step."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def connect_ray(address: str | None, num_cpus: int | None = None, resources: dict[str, float] | None = None) -> bool:
    """Connect to `address`, or start a local Ray (dashboard on 127.0.0.1) with `resources` besides CPUs and GPUs.
    Returns whether we started one."""
    import logging

    import ray

    if address:
        _check_ray_address(address)
    if ray.is_initialized():
        return False
    env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}  # else every print of a Train worker shows twice
    if address:
        try:
            ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
        except Exception as err:
            raise UserError(f"cannot connect to Ray at {address}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
        return False
    ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def _check_ray_address(address: str) -> None:
    """A host:port (or ray://host:port) that does not answer is a one-line error in seconds, not a long hang."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"Ray cluster at {address} is unreachable ({err.strerror or err}); "
                        "start it (ray start --head) or omit --address for a local Ray") from None


def gpu_settings(cfg: PipelineConfig, steps: list[str]) -> list[str]:
    """The settings by which these steps ask for GPUs."""
    pipe = cfg.pipeline
    asks = {"latent": ["pipeline.latent.use_gpu"] if pipe.latent is not None and pipe.latent.use_gpu else [],
            "evaluate": ["pipeline.evaluate.gpus"] if pipe.evaluate.gpus > 0 else []}
    for stage in ("train_forward", "train_reverse"):
        scaling = getattr(pipe, stage)
        asks[stage] = [f"pipeline.{stage}.use_gpu"] if scaling.use_gpu or scaling.resources_per_worker.get("GPU") else []
    return [setting for step in steps for setting in asks.get(step, [])]


def check_local_gpus(cfg: PipelineConfig, steps: list[str], gpus: float) -> None:
    wanted = gpu_settings(cfg, steps)
    if wanted and gpus < 1:
        raise UserError(f"{', '.join(wanted)} asks for a GPU, but the local Ray sees none on this machine: set it "
                        "false (or 0), or run on a GPU cluster with --address")
