"""One run per output root: a lock object that a second run cannot create while it exists.

The lock is created only if absent, atomically where the storage offers it: a local file
with O_CREAT | O_EXCL, a GCS object with the precondition `if_generation_match=0`. It holds
the run id, host, process and start time, so a refusal says who holds it. A run releases it
when it ends, failed or not; one that was killed leaves it behind. A lock left by a process
of this host that no longer runs is taken over (and logged); any other lock is reported with
how to remove it once that run is known to be gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
import uuid

from apache_beam.io.filesystems import FileSystems

from segclr_beam.shards import read_json

LOCK_FILE = ".segclr-lock"
_LOG = logging.getLogger(__name__)


class LockedError(RuntimeError):
    """Another run holds the output's lock; the message names it and how to remove it."""


@dataclasses.dataclass(frozen=True)
class OutputLock:
    """The lock of one run on one output root."""

    path: str
    run_id: str
    host: str
    pid: int
    started: float

    @classmethod
    def acquire(cls, root: str) -> "OutputLock":
        """Create the lock of `root` for this process, or raise LockedError."""
        lock = cls(FileSystems.join(root.rstrip("/"), LOCK_FILE), uuid.uuid4().hex,
                   socket.gethostname(), os.getpid(), time.time())
        data = json.dumps(dataclasses.asdict(lock), sort_keys=True).encode()
        if not _create_new(lock.path, data):
            holder = _holder(lock.path)
            if holder is None or not _gone(holder):
                raise LockedError(_refusal(lock.path, holder))
            _LOG.warning("taking over the lock %s left by run %s (process %s on %s, no "
                         "longer running)", lock.path, holder.get("run_id"),
                         holder.get("pid"), holder.get("host"))
            FileSystems.delete([lock.path])
            if not _create_new(lock.path, data):
                raise LockedError(_refusal(lock.path, _holder(lock.path)))
        return lock

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        holder = _holder(self.path)
        if holder is not None and holder.get("run_id") == self.run_id:
            FileSystems.delete([self.path])


def _create_new(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False if it does."""
    if FileSystems.get_scheme(path) == "gs":
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage

        bucket, _, name = path[len("gs://"):].partition("/")
        blob = storage.Client().bucket(bucket).blob(name)
        if blob.exists():  # the precondition below is what makes it atomic on GCS
            return False
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=0)
        except PreconditionFailed:
            return False
        return True
    if FileSystems.get_scheme(path) not in (None, "file"):
        if FileSystems.exists(path):
            return False
        with FileSystems.create(path) as f:  # no create-if-absent on this filesystem
            f.write(data)
        return True
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Written whole under a private name, then linked into place: creating the link fails if
    # the lock exists, and a reader never sees a lock without its record.
    fd, staged = tempfile.mkstemp(prefix=".segclr-lock-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(staged, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(staged)
    return True


def _holder(path: str) -> dict | None:
    """The record in an existing lock (None if it vanished); {} if unreadable."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None if not FileSystems.exists(path) else {}


def _gone(holder: dict) -> bool:
    """Whether the lock's process was on this host and no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _refusal(path: str, holder: dict | None) -> str:
    if holder:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = (f"run {holder.get('run_id')} (process {holder.get('pid')} on "
               f"{holder.get('host')}, started {started})")
    else:
        who = "another run"
    return (f"output: {who} is writing to this output ({path}); wait for it to finish, or "
            f"if it is no longer running, delete {path}")
