"""The step cache: content keys, a storage root (local or pyarrow.fs), atomic publishing, done records, locks.

Layout under the storage root:

    <step>/<key>/              a finished step's outputs (published at once, see `publish`)
    <step>/<key>/_done.json    its record, written atomically and last: the only thing that makes it "done"
    _work/<step>/<key>/        resumable state while it runs (checkpoints, Ray Train storage, staged outputs)
    _locks/<step>-<key>.lock   held while a run executes that step (two runs of one config never race)

A key is the sha256 of the step's own resolved config, its inputs' keys and the source code its
result depends on, so changing one setting changes the keys of that step and everything downstream
and nothing else. A step killed at any point leaves no record (it reruns, its trainer resuming from
the checkpoints in `_work/`) and no half-visible output: locally the output directory appears by
one `rename`; on object stores each object appears whole and the record is uploaded last.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from biflow.atomic import atomic_write_bytes
from biflow.cluster.storage import is_uri
from biflow.errors import UserError
from biflow.pipeline import codeset

FORMAT = "biflow-step-v1"
RECORD = "_done.json"


class CacheError(UserError):
    """The storage root cannot be used (unwritable, unreachable, foreign files), as one line."""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version(run: Callable[..., Any]) -> str:
    """The fingerprint of the sources a step's result depends on: `codeset.code_set(run)`, each file's path and content."""
    h = hashlib.sha256()
    for rel in codeset.code_set(run):
        h.update(f"{rel}\0{codeset.source_digest(rel)}\0".encode())
    return h.hexdigest()[:16]


def step_key(step: str, config: dict[str, Any], inputs: dict[str, str], code: str) -> str:
    """The cache key of one step: its own config, its inputs' keys and its code version."""
    return digest({"format": FORMAT, "step": step, "config": config, "inputs": inputs, "code": code})[:16]


def link_or_copy(src: Path, dst: Path) -> Path:
    """Hard link when possible (same filesystem: free), else copy; `dst` appears atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


class Storage:
    """The storage root: an absolute local path, or any pyarrow.fs URI (s3://, gs://, hdfs://, ...)."""

    def __init__(self, root: str, local_dir: str | None = None):
        self.root = root.rstrip("/") or "/"
        # a file:// URI goes through pyarrow.fs like an object store (resolve_storage strips it; tests use it)
        self.is_local = not (is_uri(root) or root.startswith("file://"))
        if self.is_local:
            self.fs, self.base = None, self.root
        else:
            import pyarrow.fs

            try:
                self.fs, self.base = pyarrow.fs.FileSystem.from_uri(root)
            except Exception as err:  # unknown scheme, missing credentials, unreachable endpoint
                raise CacheError(f"storage {root!r}: {type(err).__name__}: {str(err).splitlines()[0][:160]}") from None
        self.local_dir = Path(local_dir or Path.home() / ".cache" / "biflow" / "pipeline").expanduser().resolve()

    # ------------------------------------------------------------------ locations
    def uri(self, *parts: str) -> str:
        """A location under the root, as given to Ray Train or MLflow (absolute path or URI)."""
        return "/".join([self.root, *parts])

    def step_dir(self, step: str, key: str) -> Path:
        """Where a step's outputs are read from on this machine (remote storage: a local copy)."""
        return Path(self.root, step, key) if self.is_local else self.local_dir / "outputs" / step / key

    def work_dir(self, step: str, key: str) -> Path:
        """Local resumable state of one step; on remote storage Ray Train keeps its checkpoints under `uri('_work', ...)`."""
        return Path(self.root, "_work", step, key) if self.is_local else self.local_dir / "_work" / step / key

    def check_writable(self) -> None:
        try:
            if self.is_local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(Path(self.root, "_locks", ".probe"), b"ok")
            else:
                self.fs.create_dir(f"{self.base}/_locks", recursive=True)
                with self.fs.open_output_stream(f"{self.base}/_locks/.probe") as fh:
                    fh.write(b"ok")
        except Exception as err:
            raise CacheError(f"storage {self.root!r} is not writable ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None

    # ------------------------------------------------------------------- records
    def _read_bytes(self, *parts: str) -> bytes | None:
        try:
            if self.is_local:
                return Path(self.root, *parts).read_bytes()
            with self.fs.open_input_stream("/".join([self.base, *parts])) as fh:
                return fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                return None
            raise CacheError(f"storage {self.root!r}: cannot read {'/'.join(parts)} ({err})") from None

    def _size(self, *parts: str) -> int | None:
        if self.is_local:
            p = Path(self.root, *parts)
            return p.stat().st_size if p.is_file() else None
        import pyarrow.fs

        info = self.fs.get_file_info("/".join([self.base, *parts]))
        return info.size if info.type == pyarrow.fs.FileType.File else None

    def read_record(self, step: str, key: str) -> dict[str, Any] | None:
        """The done record of (step, key), or None when the step has not finished there.

        A record whose listed outputs are missing or have another size counts as not done
        (someone deleted files by hand): the step runs again and overwrites them.
        """
        raw = self._read_bytes(step, key, RECORD)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("key") != key:
            return None
        for name, size in record.get("files", {}).items():
            if self._size(step, key, name) != size:
                return None
        return record

    # ----------------------------------------------------------------- publishing
    def publish(self, step: str, key: str, staging: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Make `staging`'s files the outputs of (step, key), then write the record: the step is done.

        Call with the step's lock held. Returns the record as written (with `files`: name -> bytes).
        """
        staging = Path(staging)
        files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        record = {**record, "format": FORMAT, "step": step, "key": key, "files": files, "published": time.time()}
        blob = (json.dumps(record, indent=1, sort_keys=True, default=str) + "\n").encode()
        if self.is_local:
            final = Path(self.root, step, key)
            if final.exists():  # outputs of an earlier attempt that died before its record: never read, replace them
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)  # atomic: the directory appears whole
            atomic_write_bytes(final / RECORD, blob)  # last: now it is done
            return record
        import pyarrow.fs

        final = f"{self.base}/{step}/{key}"
        self.fs.delete_dir_contents(final, missing_dir_ok=True)
        self.fs.create_dir(final, recursive=True)
        pyarrow.fs.copy_files(str(staging), final, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{final}/{RECORD}") as fh:  # objects appear whole; this one last
            fh.write(blob)
        local = self.step_dir(step, key)  # keep the staged files as this machine's copy
        if local.exists():
            shutil.rmtree(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, local)
        atomic_write_bytes(local / RECORD, blob)
        return record

    def fetch(self, step: str, key: str) -> Path:
        """A local directory holding the outputs of a done step (remote storage: downloaded once)."""
        local = self.step_dir(step, key)
        if self.is_local or (local / RECORD).is_file():
            return local
        import pyarrow.fs

        tmp = local.with_name(f".{key}.download-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pyarrow.fs.copy_files(f"{self.base}/{step}/{key}", str(tmp), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        if local.exists():
            shutil.rmtree(local)
        os.rename(tmp, local)
        return local

    def discard_work(self, step: str, key: str) -> None:
        """Drop the resumable state of a step that is done (its checkpoints are published outputs now)."""
        work = self.work_dir(step, key)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # only when no other key of this step is in progress
        if not self.is_local:
            with contextlib.suppress(Exception):
                self.fs.delete_dir(f"{self.base}/_work/{step}/{key}")

    # --------------------------------------------------------------------- locks
    @contextlib.contextmanager
    def lock(self, step: str, key: str) -> Iterator[None]:
        """Exclusive across processes while one run executes (step, key); others wait, then find it done.

        flock on the local (or NFS) storage root; on object stores the lock is per machine, and two
        machines at once may both compute the step: they write the same content, the record last.
        """
        base = Path(self.root) if self.is_local else self.local_dir
        path = base / "_locks" / f"{step}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def locked_by_other(self, step: str, key: str) -> bool:
        """Whether another process holds (step, key)'s lock right now (`biflow status` shows it as running)."""
        base = Path(self.root) if self.is_local else self.local_dir
        path = base / "_locks" / f"{step}-{key}.lock"
        if not path.exists():
            return False
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False
