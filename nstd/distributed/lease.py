"""A worker's lease on a claimed job, kept in the job's state folder on the storage every machine mounts.

`state/jobs/<id>/lease/000001.json`, `000002.json`, ...: the highest number is the current lease.
A lease is taken by creating the next number with link(2), which is atomic and exclusive on a
local filesystem and on NFS alike (the lock-file idiom), and only when the current one is released
or has not been renewed for `lease_seconds`. The holder renews it every few seconds and checks,
before every move of the job's files, that it still holds the highest number (a fence): a worker
that stalled past its lease finds a newer one and lets the job go without touching it. So two
workers never run a job's moves at once, and a dead worker's job is free again after
`lease_seconds` (clocks must agree to well within that: NTP).

Torch-free: the intake and `nstd status` read leases too.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


LEASES = "lease"
_NUMBERED = re.compile(r"^(\d{6})\.json$")


@dataclass(frozen=True)
class Current:
    """The highest-numbered lease of a job, as read."""

    number: int
    record: dict

    def live(self, lease_seconds: float, now: float | None = None) -> bool:
        """Held: not released, and renewed within `lease_seconds`. A record that cannot be read
        yet (being written) counts as live: it was just taken."""
        if self.record.get("released"):
            return False
        renewed = self.record.get("renewed_at")
        if not isinstance(renewed, (int, float)):
            return True
        return (time.time() if now is None else now) - renewed < lease_seconds

    @property
    def holder(self) -> str:
        return str(self.record.get("holder", "?"))


def current(job_dir: Path) -> Current | None:
    """The job's current lease, or None when it never had one (or its folder is gone)."""
    try:
        names = os.listdir(job_dir / LEASES)
    except OSError:
        return None
    numbers = [int(m.group(1)) for n in names if (m := _NUMBERED.match(n))]
    if not numbers:
        return None
    top = max(numbers)
    try:
        record = json.loads((job_dir / LEASES / f"{top:06d}.json").read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            record = {}
    except (OSError, ValueError):
        record = {}
    return Current(top, record)


def free(job_dir: Path, lease_seconds: float, now: float | None = None) -> bool:
    """Nobody holds the job (its lease is released or expired, or it never had one)."""
    cur = current(job_dir)
    return cur is None or not cur.live(lease_seconds, now)


class Lease:
    """A lease this process holds on one job."""

    def __init__(self, job_dir: Path, number: int, record: dict):
        self.job_dir, self.number, self.record = job_dir, number, record

    @property
    def path(self) -> Path:
        return self.job_dir / LEASES / f"{self.number:06d}.json"

    @classmethod
    def acquire(cls, job_dir: Path, holder: str, lease_seconds: float) -> "Lease | None":
        """Take the job's lease, or None: someone holds it, someone else took it first, or the job
        has left state (delivered or quarantined meanwhile)."""
        cur = current(job_dir)
        if cur is not None and cur.live(lease_seconds):
            return None
        number = (cur.number if cur else 0) + 1
        now = time.time()
        record = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                  "taken_at": now, "renewed_at": now, "released": False,
                  "after": cur.record.get("holder") if cur else None}
        folder = job_dir / LEASES
        tmp = folder / f".take-{record['token']}"
        try:
            folder.mkdir(exist_ok=True)  # never parents: a finished job's folder is not made again
            _write(tmp, record)
        except FileNotFoundError:
            return None  # the job folder is gone: finished by someone else
        try:
            os.link(tmp, folder / f"{number:06d}.json")
        except FileExistsError:
            return None  # another worker took this number first
        except FileNotFoundError:
            return None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return cls(job_dir, number, record)

    def held(self) -> bool:
        """The fence: still the highest number, and still ours (renewed or not)."""
        cur = current(self.job_dir)
        return cur is not None and cur.number == self.number and cur.record.get("token") == self.record["token"]

    def renew(self) -> bool:
        """Say we are alive; False when the lease was lost (a newer one, or the job is gone)."""
        if not self.held():
            return False
        self.record["renewed_at"] = time.time()
        try:
            _replace(self.path, self.record)
        except OSError:
            return self.held()
        return True

    def release(self) -> None:
        """Let the job go (an orderly stop, a retry later): anyone may take it at once."""
        if not self.held():
            return
        self.record.update(released=True, renewed_at=time.time())
        try:
            _replace(self.path, self.record)
        except OSError:
            pass  # the folder went with a delivery, or the lease simply expires


def _write(path: Path, record: dict) -> None:
    """A new file, in a folder that must exist (nothing is created above it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def _replace(path: Path, record: dict) -> None:
    """Rewrite a lease in one rename; never in a folder that has gone (a delivered job's)."""
    tmp = path.with_name(f".renew-{uuid.uuid4().hex}")
    _write(tmp, record)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
