"""biflow submit: run a biflow command as a Ray job on a cluster, follow its logs, exit with its status.

    biflow submit --address http://HEAD:8265 -- run pipelines/digits.yaml --set train_forward.num_workers=2
    biflow submit --address http://HEAD:8265 --no-wait -- sweep ...
    biflow submit --status JOB | --follow JOB | --stop JOB | --list

Everything after `--` is the biflow command the job runs on the head node (its driver), with Ray
already connected (RAY_ADDRESS is set for it). The job's code is this directory, uploaded
(--working-dir, default .), or the cluster's image (--image). Before anything is uploaded, a `run`
or `status` command's pipeline is loaded here with its overrides, so a bad key fails at once, and a
storage root that the cluster's nodes cannot share is refused (see biflow/cluster/storage.py).
Plain `ray job submit --working-dir . -- biflow run ...` works as well (docs/CLUSTER.md).
"""
from __future__ import annotations

import argparse
import getpass
import shlex
import sys
import time
from pathlib import Path

from biflow.errors import UserError, first_line

HELP = "run a biflow command (run, sweep, ...) as a job on a Ray cluster and follow it"
PIPELINE_COMMANDS = ("run", "status", "sweep")  # commands that load a pipeline file with --set overrides


def add_arguments(p) -> None:
    where = p.add_argument_group("cluster")
    where.add_argument("--address", default=None, metavar="URL",
                       help="the head's dashboard address; unset: $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265")
    where.add_argument("--token", default=None, metavar="TOKEN",
                       help="Ray auth token; unset: $RAY_AUTH_TOKEN, the file in $RAY_AUTH_TOKEN_PATH, else "
                            "~/.ray/auth_token (prefer those: a --token shows in `ps` and your shell history)")
    code = p.add_argument_group("the job")
    code.add_argument("--working-dir", default=".", metavar="DIR",
                      help="directory uploaded as the job's code and working directory (pipeline paths are relative to it)")
    code.add_argument("--image", default=None, metavar="IMAGE",
                      help="run the job in this container image instead of uploading code (Ray's image_uri; "
                           "relative paths are then inside the image)")
    code.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                      help="more gitignore-style patterns left out of the upload (.venv, .git, runs, mlruns ... always are)")
    code.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable of the job (repeatable; a bare KEY copies this shell's value)")
    code.add_argument("--storage", default=None, metavar="ROOT",
                      help="storage root every node shares (s3://bucket/biflow, an NFS path): "
                           "--set pipeline.storage=ROOT for run/status/sweep, $BIFLOW_STORAGE for every command")
    code.add_argument("--tracking-uri", default=None, metavar="URI",
                      help="MLflow tracking server as the cluster's nodes reach it (e.g. http://mlflow:5000): "
                           "$MLFLOW_TRACKING_URI of the job; unset: the cluster's own environment decides")
    code.add_argument("--shared-storage", action="store_true",
                      help="declare a local-looking storage path shared by every node (an NFS mount, or a one-machine "
                           "test cluster): sets BIFLOW_SHARED_STORAGE=1")
    code.add_argument("--job-id", default=None, metavar="ID", help="submission id; unset: Ray picks raysubmit_...")
    code.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the logs")
    other = p.add_argument_group("existing jobs (instead of a command)")
    one = other.add_mutually_exclusive_group()
    one.add_argument("--status", metavar="JOB", help="print a job's status (exit 1 if it failed or was stopped)")
    one.add_argument("--follow", metavar="JOB", help="follow a job's logs until it ends; exit with its status")
    one.add_argument("--stop", metavar="JOB", help="stop a job and wait (up to 60 s) until it has stopped")
    one.add_argument("--list", action="store_true", help="list the cluster's jobs")
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the biflow command the job runs, e.g. -- run pipelines/digits.yaml --set ...")


def run(args) -> int:
    from biflow.cluster import auth
    from biflow.cluster.dashboard import Dashboard

    command = list(args.job_command)
    if command[:1] == ["--"]:
        command = command[1:]
    existing = args.status or args.follow or args.stop or args.list
    if existing and command:
        raise UserError("give either a command to submit (after --) or one of --status/--follow/--stop/--list, not both")
    if not existing and not command:
        raise UserError("nothing to submit: put the biflow command after --, e.g. "
                        "biflow submit --address http://HEAD:8265 -- run pipelines/digits.yaml")
    dash = Dashboard(args.address, auth.find_token(args.token))
    if args.list:
        return _list(dash)
    if args.status:
        return _status(dash, args.status)
    if args.stop:
        return _stop(dash, args.stop)
    if args.follow:
        return _follow(dash, args.follow)
    return _submit(dash, args, command)


# ---------------------------------------------------------------------- submit
def job_command(command: list[str], storage: str | None, tracking_uri: str | None) -> list[str]:
    """The biflow argv the job runs: `command`, with --storage/--tracking-uri as overrides for run/status/sweep."""
    from biflow.cli import build_parser

    _, modules = build_parser()
    name = command[0]
    if name == "submit":
        raise UserError("the job's command cannot be `submit` itself")
    if name not in modules:
        raise UserError(f"-- {name}: not a biflow command (commands: {', '.join(sorted(modules))}); "
                        "for any other program use `ray job submit`")
    out = list(command)
    if name in PIPELINE_COMMANDS:
        if storage:
            out += ["--set", f"pipeline.storage={storage}"]
        if tracking_uri:
            out += ["--set", f"pipeline.tracking_uri={tracking_uri}"]
    return out


def preflight(command: list[str], job_env: dict[str, str], dash, working_dir: Path | None) -> list[str]:
    """Check here what would fail on the cluster: the command's arguments, and for run/status/sweep the pipeline, its
    storage root and tracking store against the cluster's node count. Returns notes to print."""
    from biflow.cli import build_parser
    from biflow.cluster.storage import SharedStorageError, check_shared_storage, check_tracking_uri, is_uri

    parser, _ = build_parser()
    try:
        args = parser.parse_args(command)
    except SystemExit:  # argparse printed what is wrong
        raise UserError(f"the job's command `biflow {shlex.join(command)}` is invalid (see above)") from None
    if command[0] not in PIPELINE_COMMANDS:
        return []
    from biflow.pipeline.spec import load_pipeline

    path = Path(args.pipeline)
    if working_dir is not None:
        local = path if path.is_absolute() else working_dir / path
        if not local.resolve().is_relative_to(working_dir):
            raise UserError(f"{args.pipeline} is outside --working-dir {working_dir}: the job would not find it; "
                            "put the pipeline file under the uploaded directory (or use --image with a path in the image)")
        cfg = load_pipeline(local, args.overrides)
    else:
        cfg = load_pipeline(path, args.overrides) if path.is_file() else None
    if cfg is None:
        return [f"{args.pipeline} is not here: it is read from the image on the cluster"]
    root = cfg.pipeline.storage
    if not is_uri(root) and not Path(root.removeprefix("file://")).expanduser().is_absolute() and not root.startswith("~"):
        raise SharedStorageError(
            f"pipeline.storage {root} is relative: on the cluster it would land in the job's temporary working "
            "directory on the head and be lost with it; pass --storage s3://bucket/biflow (or a shared absolute path)")
    nodes = len(dash.nodes())
    check_shared_storage(root, nodes, job_env, detect_mounts=False)
    tracking = cfg.pipeline.tracking_uri or job_env.get("MLFLOW_TRACKING_URI")
    if tracking:
        check_tracking_uri(tracking, nodes, job_env, detect_mounts=False)
    notes = [f"storage {root} ({nodes} node{'s' if nodes != 1 else ''})"]
    notes.append(f"MLflow {tracking}" if tracking else "MLflow: the cluster's $MLFLOW_TRACKING_URI (pass --tracking-uri to choose)")
    return notes


def _submit(dash, args, command: list[str]) -> int:
    from biflow.cluster.jobs import parse_env, runtime_env
    from biflow.cluster.storage import SHARED_ENV

    job_env = parse_env(args.env)
    if args.storage:
        job_env["BIFLOW_STORAGE"] = args.storage
    if args.tracking_uri:
        job_env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.shared_storage:
        job_env[SHARED_ENV] = "1"
    argv = job_command(command, args.storage, args.tracking_uri)
    working_dir = None if args.image else Path(args.working_dir).expanduser().resolve()
    env = runtime_env(working_dir, args.image, job_env, args.exclude)
    notes = preflight(argv, job_env, dash, working_dir)
    entrypoint = shlex.join(["biflow", *argv])
    source = f"image {args.image}" if args.image else f"upload of {working_dir}"
    print(f"submitting to {dash.address}: {entrypoint}", flush=True)
    print(f"  code: {source}" + "".join(f"; {n}" for n in notes), flush=True)
    try:
        job_id = dash.jobs.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=args.job_id,
                                      metadata={"biflow_command": argv[0], "submitted_by": getpass.getuser()})
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - upload too large, duplicate id, runtime env rejected ...

        raise UserError(f"the cluster at {dash.address} did not accept the job: {first_line(err)}") from None
    print(f"job {job_id} submitted", flush=True)
    if args.no_wait:
        print(f"  follow: biflow submit --address {dash.address} --follow {job_id}\n"
              f"  stop:   biflow submit --address {dash.address} --stop {job_id}")
        return 0
    return _follow(dash, job_id)


# ---------------------------------------------------------------- existing jobs
def _info(dash, job_id: str):
    try:
        return dash.jobs.get_job_info(job_id)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray raises RuntimeError for an unknown id
        raise UserError(f"no job {job_id} on {dash.address} ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})") from None


def _follow(dash, job_id: str) -> int:
    from biflow.cluster.jobs import follow

    _info(dash, job_id)
    print(f"following job {job_id} (Ctrl-C stops following, not the job)", flush=True)
    try:
        result = follow(dash.jobs, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on. Follow again: biflow submit --address {dash.address} "
              f"--follow {job_id}; stop it: --stop {job_id}", file=sys.stderr)
        return 130
    took = f" in {result.seconds:.1f} s" if result.seconds is not None else ""
    if result.status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED{took}", flush=True)
    else:
        print(f"job {job_id} {result.status}{took} (exit code {result.exit_code}): {result.message}", file=sys.stderr, flush=True)
    return result.exit_code


def _status(dash, job_id: str) -> int:
    from biflow.cluster.jobs import describe

    info = _info(dash, job_id)
    print("\n".join(describe(info)))
    return 1 if info.status.value in ("FAILED", "STOPPED") else 0


def _stop(dash, job_id: str) -> int:
    info = _info(dash, job_id)
    if info.status.is_terminal():
        print(f"job {job_id} already ended: {info.status.value}")
        return 0
    dash.jobs.stop_job(job_id)
    print(f"stopping job {job_id} ...", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = dash.jobs.get_job_status(job_id)
        if status.is_terminal():
            print(f"job {job_id} {status.value}")
            return 0
        time.sleep(1)
    raise UserError(f"job {job_id} has not stopped after 60 s (Ray sends SIGTERM, then SIGKILL); check with --status")


def _list(dash) -> int:
    jobs = sorted(dash.jobs.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print(f"no jobs on {dash.address}")
        return 0
    print(f"{'job':<28} {'status':<10} {'started':<19}  entrypoint")
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
        print(f"{j.submission_id or j.job_id:<28} {j.status.value:<10} {when:<19}  {entry}")
    return 0
