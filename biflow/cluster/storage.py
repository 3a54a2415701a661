"""Shared state on a multi-node cluster: the checks that turn a silent split into one clear error.

On one machine everything may live in a local directory. On a cluster every node must see the same
storage root (step cache, Ray Train `storage_path`, Tune results) and write to the same tracking
store: a local path on the head is a *different* empty directory on every other node, and a sqlite
file is reachable from one node only. The symptoms otherwise are a step that cannot find its
input, a trainer that cannot restore, or runs scattered over per-node databases.

A location counts as shared when it is

    a URI                           s3://, gs://, abfs://, hdfs://, ... (anything pyarrow.fs opens)
    on a network filesystem         NFS, CIFS/SMB, Lustre, GPFS, CephFS, BeeGFS, gcsfuse, s3fs, ... (read from /proc/mounts)
    declared shared                 BIFLOW_SHARED_STORAGE=1, for mounts we cannot recognise (and one-machine test clusters)

`check_shared_storage` / `check_tracking_uri` take the node count and raise `SharedStorageError`;
`check_cluster` asks the connected Ray for the count (the pipeline driver calls it after connecting).
"""
from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from biflow.errors import UserError

SHARED_ENV = "BIFLOW_SHARED_STORAGE"
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs", "beegfs", "afs",
    "panfs", "wekafs", "9p", "ocfs2", "gfs2", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.goofys",
    "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs", "fuse.rclone", "fuse.cephfs", "fuse.lustre", "fuse.alluxio-fuse",
    "fuse.blobfuse", "fuse.blobfuse2", "fuse.azure", "fuse.weka",
})


class SharedStorageError(UserError):
    """Node-local storage or tracking on a multi-node cluster."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def declared_shared(env: Mapping[str, str] = os.environ) -> bool:
    """BIFLOW_SHARED_STORAGE=1: the user says local-looking paths are the same on every node."""
    return _truthy(env.get(SHARED_ENV))


def is_uri(location: str) -> bool:
    """Whether `location` names a store other than this machine's files: a URI such as s3://bucket/x,
    http://host:5000 or sqlite:///x. A file:// URI and a plain path are local; a Windows drive letter is not a scheme."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"


def _unescape(field: str) -> str:
    """/proc/mounts escapes spaces, tabs, newlines and backslashes as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def filesystem_type(path: str | Path, mounts: str = "/proc/mounts") -> str | None:
    """Type of the filesystem `path` is (or would be) on: 'ext4', 'nfs4', ...; None if unknown."""
    p = Path(path).expanduser().absolute()
    existing, rest = p, []
    while not existing.exists() and existing != existing.parent:  # symlinks resolved where the path exists
        rest.insert(0, existing.name)
        existing = existing.parent
    try:
        p = existing.resolve().joinpath(*rest)
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        if (str(p) == point or str(p).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def shared_reason(location: str, env: Mapping[str, str] = os.environ, detect_mounts: bool = True) -> str | None:
    """Why `location` is reachable from every node ('object store URI', 'nfs4 mount', ...), or None when it is not known to be.

    detect_mounts=False when this process runs on another machine than the cluster (the submitting
    laptop): its /proc/mounts says nothing about the nodes' mounts.
    """
    if is_uri(location):
        return f"{location.partition('://')[0]}:// URI"
    if declared_shared(env):
        return f"{SHARED_ENV}=1"
    if detect_mounts:
        fstype = filesystem_type(location.removeprefix("file://"))
        if fstype in NETWORK_FILESYSTEMS:
            return f"{fstype} mount"
    return None


def check_shared_storage(root: str, num_nodes: int, env: Mapping[str, str] = os.environ, detect_mounts: bool = True,
                         shared: bool = False, what: str = "pipeline.storage") -> None:
    """Raise when a cluster of several nodes would use a storage root only one node can see.

    shared=True: the configuration declares the root shared (an NFS mount we cannot recognise).
    """
    if num_nodes <= 1 or shared or shared_reason(root, env, detect_mounts):
        return
    where = "" if not detect_mounts else f" ({filesystem_type(root.removeprefix('file://')) or 'local'} filesystem)"
    raise SharedStorageError(
        f"{what} {root} is a node-local path{where} but the Ray cluster has {num_nodes} nodes: steps, Ray Train "
        f"workers and Tune trials on the other nodes would each see their own empty copy. Set {what} to a shared "
        f"location (s3://bucket/biflow, gs://..., an NFS mount), or set {SHARED_ENV}=1 if {root} is the same "
        "shared filesystem on every node")


def check_tracking_uri(uri: str, num_nodes: int, env: Mapping[str, str] = os.environ, detect_mounts: bool = True,
                       shared: bool = False) -> None:
    """Raise when a multi-node run would log to a sqlite file on one node (a relative one is wrong even on one node)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file" or (not parsed.scheme and uri):
        raise SharedStorageError(f"tracking URI {uri!r}: MLflow's file store is not supported; use an MLflow server "
                                 "(http://HOST:5000) on a cluster, sqlite:////abs/path/mlflow.db on one machine")
    if parsed.scheme != "sqlite":
        return
    path = uri.removeprefix("sqlite:///")
    if not path.startswith("/"):
        raise SharedStorageError(f"tracking URI {uri} is relative: every Ray worker would open its own database in its "
                                 "own working directory; use sqlite:////abs/path/mlflow.db or an MLflow server")
    if num_nodes <= 1 or shared or shared_reason(str(Path(path).parent), env, detect_mounts):
        return
    raise SharedStorageError(
        f"tracking URI {uri} is a sqlite file on one node but the Ray cluster has {num_nodes} nodes: steps on the other "
        "nodes cannot record their runs there. Run an MLflow server (docker/docker-compose.yml has one) and set "
        f"MLFLOW_TRACKING_URI or pipeline.tracking_uri to http://HOST:5000 (or {SHARED_ENV}=1 if the file is on "
        "shared storage)")


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive (1 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_cluster(storage_root: str, tracking_uri: str | None = None, shared: bool = False,
                  env: Mapping[str, str] = os.environ) -> int:
    """Both checks against the connected Ray cluster (call in the driver, after ray.init). Returns the node count."""
    nodes = alive_nodes()
    check_shared_storage(storage_root, nodes, env, shared=shared)
    if tracking_uri:
        check_tracking_uri(tracking_uri, nodes, env, shared=shared)
    return nodes
