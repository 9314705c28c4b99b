"""A worker's lease on a claimed job, kept in the job's state folder on the storage every machine mounts.

`state/jobs/<id>/lease/000001.json`, `000002.json`, ...: the highest number is the current lease.
A lease is taken by creating the next number with link(2), which is atomic and exclusive on a
local filesystem and on NFS alike (the lock-file idiom), and only when the current one is released
or has not been renewed for `lease_seconds` (the longer of the taker's and the holder's own
setting, which the record carries). The holder renews it every few seconds and checks, before
every move of the job's files, that it still holds the highest number (a fence): a worker that
stalled past its lease finds a newer one and lets the job go without touching it. So two workers
never run a job's moves at once, and a dead worker's job is free again after `lease_seconds`.

Liveness is judged on the reader's own monotonic clock, never by comparing clocks: the holder
writes a new record at each renewal (a `beat` count goes up), and a reader counts a lease expired
once it has itself seen the same record, unchanged, for `lease_seconds` (`Sightings`). So no wall
clock, stepped either way on any machine (NTP, an operator, a VM resumed), takes a running job or
keeps a dead one's: `renewed_at` is there for people to read. The price: a process that has just
started counts every unreleased lease as live until it has watched it for `lease_seconds`.

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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

LEASES = "lease"
_NUMBERED = re.compile(r"^(\d{6,})\.json$")


def _name(number: int) -> str:
    return f"{number:06d}.json"


#: The only clock liveness is read on: this process's monotonic one (tests replace it).
_clock = time.monotonic


class Sightings:
    """For how long this process has seen a file's content unchanged, on its monotonic clock.
    What other machines' clocks say never enters it; a value never seen before counts from now,
    so a judgement made from sightings is late, never early. At most `size` files are
    remembered (the oldest seen are forgotten, and so counted again from their next sighting)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._seen: OrderedDict[str, tuple[object, float]] = OrderedDict()
        self._lock = threading.Lock()

    def unchanged_for(self, key: str, value: object) -> float:
        now = _clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or seen[0] != value:
                seen = (value, now)
            self._seen[key] = seen
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return now - seen[1]


SIGHTINGS = Sightings()


@dataclass(frozen=True)
class Current:
    """The highest-numbered lease of a job, as read."""

    number: int
    record: dict
    #: seconds this process has seen this very record (or unreadable file) unchanged
    silent_for: float = 0.0

    def live(self, lease_seconds: float) -> bool:
        """Held: not released, and renewed within the last `lease_seconds` (or the holder's own, if
        longer) as this process has watched it. A record that cannot be read (being written, or
        cut short by a crash) counts as live until it has stayed so for as long."""
        if self.record.get("released"):
            return False
        theirs = self.record.get("lease_seconds")
        if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and 0 < theirs < 10**7:
            lease_seconds = max(lease_seconds, theirs)
        return self.silent_for < lease_seconds

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
        raw = path.read_bytes()[:_RECORD_MAX]
    except OSError as exc:
        raw = f"unreadable: {exc.errno}".encode()
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            record = {}
    except ValueError:
        record = {}
    return Current(top, record, SIGHTINGS.unchanged_for(str(job_dir), (top, raw)))


#: A lease record is a few hundred bytes: more is not one of ours, and is not kept in memory.
_RECORD_MAX = 4096


def free(job_dir: Path, lease_seconds: float) -> bool:
    """Nobody holds the job (its lease is released or expired, or it never had one)."""
    cur = current(job_dir)
    return cur is None or not cur.live(lease_seconds)


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
                  "taken_at": now, "renewed_at": now, "beat": 0, "lease_seconds": lease_seconds, "released": False,
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
            self.record.update(renewed_at=time.time(), beat=self.record["beat"] + 1)
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
            self.record.update(released=True, renewed_at=time.time(), beat=self.record["beat"] + 1)
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
