"""The sweep's Ray Tune setup: the Ray session, where trial state may live, each trial's resources, the scheduler
and the search algorithm, and how trials are named."""
from __future__ import annotations

from biflow.errors import UserError
from biflow.pipeline.cache import Storage
from biflow.sweep.space import Space

TRAIN_DRIVER = "train_driver"  # custom resource of trials that only drive a Ray Train run (see ECOSYSTEM)


def connect(address: str | None) -> bool:
    """A local Ray (with the train_driver resource for data-parallel trials), or the cluster at `address`."""
    from biflow.pipeline.ray_session import connect_ray

    return connect_ray(address, resources={TRAIN_DRIVER: 64})


def check_sweep_storage(storage: Storage) -> None:
    """A sweep keeps Tune's state and trial checkpoints under the storage root, or, for an object-store root, on
    the driver's disk: several nodes then cannot share them, so that is refused rather than losing trials' work."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_local and len(nodes) > 1:
        raise UserError(f"pipeline.storage {storage.root}: a sweep on {len(nodes)} nodes needs a shared filesystem "
                        "root (an NFS path mounted everywhere); object-store roots work for `biflow run`, and for "
                        "sweeps on one machine")


def trial_resources(space: Space, cfg) -> tuple[dict[str, float], int]:
    """(Tune resources of one trial, how many fit at once)."""
    import ray

    total = ray.cluster_resources()
    cpus = total.get("CPU", 1.0)
    workers = cfg.train_reverse.num_workers
    if workers == 0:
        per = space.spec.cpus_per_trial
        fit = max(1, int(cpus // per))
        return {"cpu": per}, min(space.spec.max_concurrent or fit, fit)
    scaling = cfg.pipeline.train_reverse
    per_worker = scaling.resources_per_worker.get("CPU", 0 if scaling.use_gpu else 1)
    fit = max(1, int(cpus // max(per_worker * workers, 1e-9))) if per_worker else space.spec.max_concurrent or 1
    res = {"cpu": 0, TRAIN_DRIVER: 1} if total.get(TRAIN_DRIVER) else {"cpu": 0.01}
    return res, min(space.spec.max_concurrent or fit, fit)


def build_scheduler(space: Space, steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.spec.scheduler
    grace = min(s.grace_period or 2 * space.spec.report_every, s.max_t or steps)
    if s.type == "asha":  # stop_last_trials=False: a trial that reaches max_t still gets scored
        return ASHAScheduler(time_attr="step", metric=space.scheduler_metric, mode="min", max_t=s.max_t or steps, grace_period=grace,
                             reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=False)
    return FIFOScheduler()


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def trial_dirname(trial) -> str:
    return trial.trial_id


def search_algorithm(space: Space, concurrent: int):
    """Grid and random search (Tune's variant generator), seeded; it also caps the trials running at once."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.spec.seed, max_concurrent=concurrent)
