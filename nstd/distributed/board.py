"""The cluster's work list: the claimed jobs in state/jobs/, in priority order, with their leases.

The broker carries interchangeable messages ("a job is waiting"); which job a worker runs is read
here, from the shared state folder, when it takes a message: the highest priority, then the job
file that arrived first, among the jobs nobody holds. So priority order holds across the cluster
exactly (the broker's few priority levels would only approximate it), a redelivered or surplus
message can never run a job twice (the lease decides), and a lost message loses no job: the
intake keeps at least as many messages queued as there are jobs to take (nstd/distributed/dispatch.py).

Torch-free.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nstd.distributed import lease
from nstd.fsutil import atomic_write_text

#: A job a worker could not finish for a reason of nstd's (a full outbox): not taken again before.
HELD = "held.json"


@dataclass(frozen=True)
class Entry:
    id: str
    name: str
    folder: Path
    priority: int
    arrived: float
    claimed: float
    attempts: int
    #: seconds it is still held back for (board.hold), as this process has watched the hold
    held_for: float
    lease: lease.Current | None

    def sort_key(self) -> tuple:
        """As the local queue's: highest priority first, then the job file that arrived first."""
        return (-self.priority, self.arrived, self.claimed, self.id)

    def taken(self, lease_seconds: float) -> bool:
        return self.lease is not None and self.lease.live(lease_seconds)

    def takeable(self, lease_seconds: float) -> bool:
        return not self.taken(lease_seconds) and self.held_for <= 0


def scan(jobs_dir: Path) -> list[Entry]:
    """Every claimed job (claim.json readable) with its lease, best first. Folders being claimed
    (hidden transfers) and leftovers without a record are not jobs."""
    entries = []
    try:
        names = sorted(n for n in os.listdir(jobs_dir) if not n.startswith("."))
    except OSError:
        return entries
    for name in names:
        folder = jobs_dir / name
        try:
            r = json.loads((folder / "claim.json").read_text(encoding="utf-8"))
            t = r["times"]
            entry = Entry(id=str(r["id"]), name=str(r["name"]), folder=folder,
                          priority=int(r["settings"].get("priority", 0)), arrived=float(t["arrived"]),
                          claimed=float(t["claimed"]), attempts=int(r.get("attempts", 0)),
                          held_for=_held_for(folder), lease=lease.current(folder))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        entries.append(entry)
    entries.sort(key=Entry.sort_key)
    return entries


def leftovers(jobs_dir: Path) -> list[Path]:
    """Job folders without a record: what a delivery's clean-up left when it was cut short (a
    claim gets its record before its folder appears)."""
    try:
        names = sorted(n for n in os.listdir(jobs_dir) if not n.startswith("."))
    except OSError:
        return []
    return [jobs_dir / n for n in names if (jobs_dir / n).is_dir() and not (jobs_dir / n / "claim.json").exists()]


def takeable(jobs_dir: Path, lease_seconds: float) -> list[Entry]:
    """The jobs a worker may take now, best first."""
    return [e for e in scan(jobs_dir) if e.takeable(lease_seconds)]


def observe(jobs_dir: Path) -> None:
    """Read every job's lease and hold, so that this process's sightings of them start now (a
    worker's heartbeat: a dead worker's job is then free to it `lease_seconds` after its start,
    not after its first message)."""
    try:
        names = [n for n in os.listdir(jobs_dir) if not n.startswith(".")]
    except OSError:
        return
    for name in names:
        try:
            lease.current(jobs_dir / name)
        except OSError:
            pass
        _held_for(jobs_dir / name)


def hold(folder: Path, seconds: float, reason: str) -> None:
    """Keep a job from being taken for `seconds` (nstd failed to move it), counted by each reader
    from when it first sees the hold, on its own monotonic clock: no machine's wall clock, right
    or wrong, shortens or stretches it. `until` is for people to read."""
    record = {"seconds": max(0.0, seconds), "until": time.time() + seconds, "reason": reason, "token": uuid.uuid4().hex}
    atomic_write_text(folder / HELD, json.dumps(record), parents=False)


def unhold(folder: Path) -> None:
    try:
        os.unlink(folder / HELD)
    except OSError:
        pass


def _held_for(folder: Path) -> float:
    try:
        raw = (folder / HELD).read_bytes()[:4096]
        seconds = float(json.loads(raw)["seconds"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: not held
        return 0.0
    if not 0 < seconds < 86400:
        return 0.0
    return seconds - lease.SIGHTINGS.unchanged_for(str(folder / HELD), raw)
