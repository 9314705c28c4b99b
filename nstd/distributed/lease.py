"""A worker's lease on a claimed job, kept in the job's state folder on the storage every machine mounts.

`state/jobs/<id>/lease/000001.json`, `000002.json`, ...: the highest number is the current lease.
A lease is taken by creating the next number with link(2), which is atomic and exclusive on a
local filesystem and on NFS alike (the lock-file idiom), and only when the current one is released
or has not been renewed for `lease_seconds` (the longer of the taker's and the holder's own
setting, which the record carries). The holder renews it every few seconds and checks, before
every move of the job's files, that it still holds the highest number (a fence): a worker that
stalled past its lease finds a newer one and lets the job go without touching it. So two workers
never run a job's moves at once, and a dead worker's job is free again after `lease_seconds`.

Liveness compares the holder's clock with the reader's: the machines' clocks must agree to well
within `lease_seconds` (NTP); `nstd worker` refuses to start when its clock is a quarter of that
away from the broker's (nstd/distributed/node.py).

Torch-free: the intake and `nstd status` read leases too.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

LEASES = "lease"
_NUMBERED = re.compile(r"^(\d{6,})\.json$")


def _name(number: int) -> str:
    return f"{number:06d}.json"


@dataclass(frozen=True)
class Current:
    """The highest-numbered lease of a job, as read."""

    number: int
    record: dict
    #: the file's modification time: the age of a record that cannot be read
    mtime: float = 0.0

    def live(self, lease_seconds: float, now: float | None = None) -> bool:
        """Held: not released, and renewed within `lease_seconds` (or the holder's own, if longer).
        A record that cannot be read (being written, or cut short by a crash) counts as live for
        `lease_seconds` after its file was last written."""
        if self.record.get("released"):
            return False
        now = time.time() if now is None else now
        theirs = self.record.get("lease_seconds")
        if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and 0 < theirs < 10**7:
            lease_seconds = max(lease_seconds, theirs)
        renewed = self.record.get("renewed_at")
        if not isinstance(renewed, (int, float)) or isinstance(renewed, bool):
            renewed = self.mtime
        return now - renewed < lease_seconds

    @property
    def holder(self) -> str:
        return str(self.record.get("holder", "?"))


def _numbers(job_dir: Path) -> list[int]:
    """The lease numbers in the folder; raises OSError when it cannot be read (other than absent):
    "cannot read" must never pass for "no lease"."""
    try:
        names = os.listdir(job_dir / LEASES)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _NUMBERED.match(n)))


def current(job_dir: Path) -> Current | None:
    """The job's current lease, or None when it never had one (or its folder is gone)."""
    numbers = _numbers(job_dir)
    if not numbers:
        return None
    top = numbers[-1]
    # A listing cached by an NFS client may be a few seconds old: look for newer names directly.
    while (job_dir / LEASES / _name(top + 1)).exists():
        top += 1
    path = job_dir / LEASES / _name(top)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = time.time()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            record = {}
    except (OSError, ValueError):
        record = {}
    return Current(top, record, mtime)


def free(job_dir: Path, lease_seconds: float, now: float | None = None) -> bool:
    """Nobody holds the job (its lease is released or expired, or it never had one)."""
    cur = current(job_dir)
    return cur is None or not cur.live(lease_seconds, now)


class Lease:
    """A lease this process holds on one job."""

    def __init__(self, job_dir: Path, number: int, record: dict):
        self.job_dir, self.number, self.record = job_dir, number, record
        #: renew (the heartbeat thread) and release (the worker's) write the same file
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.job_dir / LEASES / _name(self.number)

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
                  "taken_at": now, "renewed_at": now, "lease_seconds": lease_seconds, "released": False,
                  "after": cur.record.get("holder") if cur else None}
        folder = job_dir / LEASES
        tmp = folder / f".take-{record['token']}"
        try:
            folder.mkdir(exist_ok=True)  # never parents: a finished job's folder is not made again
            _write(tmp, record)
        except FileNotFoundError:
            return None  # the job folder is gone: finished by someone else
        try:
            try:
                os.link(tmp, folder / _name(number))
            except FileExistsError:
                # Over NFS a retransmitted link that did succeed answers EEXIST: the count tells.
                if os.stat(tmp).st_nlink != 2:
                    return None  # another worker took this number first
            except FileNotFoundError:
                return None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        held = cls(job_dir, number, record)
        held._prune()
        return held

    def _prune(self) -> None:
        """Older leases are history: keep the one before ours (its holder's name), drop the rest."""
        try:
            numbers = _numbers(self.job_dir)
        except OSError:
            return
        for n in numbers:
            if n < self.number - 1:
                try:
                    os.unlink(self.job_dir / LEASES / _name(n))
                except OSError:
                    pass

    def held(self) -> bool:
        """The fence: still the highest number, and still ours (renewed or not). A lease that
        cannot be read is not held: nothing proves it is still ours."""
        try:
            cur = current(self.job_dir)
        except OSError:
            return False
        return cur is not None and cur.number == self.number and cur.record.get("token") == self.record["token"]

    def renew(self) -> bool:
        """Say we are alive; False when the lease was lost (a newer one, or the job is gone) or
        given up."""
        with self._lock:
            if self.record["released"] or not self.held():
                return False
            self.record["renewed_at"] = time.time()
            try:
                _replace(self.path, self.record)
            except OSError:
                return self.held()
            return True

    def release(self) -> None:
        """Let the job go (an orderly stop, a retry later): anyone may take it at once."""
        with self._lock:
            if self.record["released"] or not self.held():
                self.record["released"] = True
                return
            self.record.update(released=True, renewed_at=time.time())
            try:
                _replace(self.path, self.record)
            except OSError:
                pass  # the folder went with a delivery, or the lease simply expires


def _write(path: Path, record: dict) -> None:
    """A new file, complete on disk before it is linked anywhere, in a folder that must exist
    (nothing is created above it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _replace(path: Path, record: dict) -> None:
    """Rewrite a lease in one rename; never in a folder that has gone (a delivered job's)."""
    tmp = path.with_name(f".renew-{uuid.uuid4().hex}")
    _write(tmp, record)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
