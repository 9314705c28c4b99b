"""`nstd cancel NAME`: a queued job to quarantine as "cancelled", a running one stopped at its next step.

With a daemon running, the command leaves a request, `state/cancel/<job id>`, that the intake
loop reads within a tick (the daemon owns its queue and its worker; no second process touches
them). With none running, the command takes the root's lock itself, so no daemon can start
meanwhile, and moves the claimed job to quarantine. Either way the job's files are moved, never
deleted.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nstd.daemon import safefs
from nstd.errors import ErrorKind, ExitCode, JobError, NstdError, Stage
from nstd.fsutil import atomic_write_text

REQUESTS = "cancel"


class NoSuchJob(NstdError):
    """No claimed job has that name (exit 4)."""

    exit_code = ExitCode.NO_SUCH_JOB


@dataclass(frozen=True)
class Claimed:
    id: str
    name: str
    folder: Path


def claimed(jobs_dir: Path) -> list[Claimed]:
    """Every claimed job in state/jobs/, oldest first (read from claim.json, torch-free)."""
    out = []
    try:
        folders = sorted(d for d in jobs_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return out
    for d in folders:
        try:
            record = json.loads((d / "claim.json").read_text())
            out.append(Claimed(str(record["id"]), str(record["name"]), d))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def find(jobs_dir: Path, name: str, outbox: Path | None = None) -> Claimed:
    """The claimed job called `name` (its job file's name without .yaml) or with that id."""
    jobs = claimed(jobs_dir)
    found = [j for j in jobs if name in (j.id, j.name)]
    if not found and outbox is not None and "/" not in name and name not in ("", ".", "..") and (outbox / name).is_dir():
        raise NoSuchJob(f"{name!r} is not queued or running: it has finished (see {outbox / name})")
    if not found:
        known = ", ".join(j.name for j in jobs) or "none"
        raise NoSuchJob(f"no queued or running job is called {name!r} (claimed now: {known}); "
                        "nor waiting in the inbox")
    if len(found) > 1:
        raise NoSuchJob(f"several jobs are called {name!r}: give the id of one ({', '.join(j.id for j in found)})")
    return found[0]


# ------------------------------------------------------------------ the request files


def ask(state: Path, job_id: str) -> None:
    atomic_write_text(state / REQUESTS / job_id, f"{time.time()}\n")


#: A request for a job still in the inbox: `inbox-<digest of its job file's name>`, the name inside.
INBOX_PREFIX = "inbox-"


def ask_inbox(state: Path, sidecar: str) -> str:
    """Ask the intake to quarantine the job file `sidecar` (a name in the inbox) as cancelled
    before it is taken; the request's name."""
    import hashlib

    key = INBOX_PREFIX + hashlib.sha256(sidecar.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    atomic_write_text(state / REQUESTS / key, sidecar + "\n")
    return key


def inbox_request(state: Path, key: str) -> str | None:
    """The job file's name an inbox request names (None: unreadable, or not one)."""
    try:
        return (state / REQUESTS / key).read_bytes()[:4096].decode("utf-8", "surrogateescape").strip() or None
    except OSError:
        return None


def in_inbox(inbox: Path, name: str) -> str | None:
    """The job file in the inbox that `name` (with or without its suffix) names, if any."""
    from nstd.daemon.jobfile import SIDECAR_SUFFIXES

    if "/" in name or name in ("", ".", ".."):
        return None
    candidates = [name] if name.endswith(SIDECAR_SUFFIXES) else [name + s for s in SIDECAR_SUFFIXES]
    return next((c for c in candidates if os.path.lexists(inbox / c)), None)


def requests(state: Path) -> list[str]:
    """Job ids asked to be cancelled; an absent folder means none (one listdir a tick)."""
    try:
        return sorted(n for n in os.listdir(state / REQUESTS) if not n.startswith("."))
    except OSError:
        return []


def answered(state: Path, job_id: str) -> bool:
    """Drop a request once acted on; False when it cannot be (written by another user, say)."""
    try:
        os.unlink(state / REQUESTS / job_id)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def cancelled_error(stage: Stage, detail: str = "") -> JobError:
    return JobError(ErrorKind.CANCELLED, "cancelled with nstd cancel" + detail, stage)


# ------------------------------------------------------------------ the command


@dataclass(frozen=True)
class Said:
    """What `nstd cancel` did: `outcome` is "cancelled" (in the quarantine now), "asked" (the
    daemon or the job's worker stops it at its next step) or "finished" (it ended first)."""

    outcome: str
    job: str
    id: str
    line: str
    where: str | None = None

    def __str__(self) -> str:
        return self.line


def cancel(cfg: dict, name: str, wait_seconds: float) -> Said:
    """Cancel the claimed job `name`; returns what happened."""
    from nstd.daemon.lock import AlreadyRunning, RootLock
    from nstd.daemon.store import Folders

    folders = Folders.from_config(cfg)
    try:
        job = find(folders.jobs, name, folders.outbox)
    except NoSuchJob:
        sidecar = in_inbox(folders.inbox, name)
        if sidecar is None:
            raise
        return _cancel_in_inbox(folders, sidecar, wait_seconds)
    try:
        lock = RootLock(folders.state)
    except AlreadyRunning:
        return _ask_the_daemon(folders, job, wait_seconds)
    except OSError as exc:
        raise NstdError(f"cannot reach the state folder {folders.state}: {exc.strerror or exc}") from None
    try:
        if cfg["queue"]["backend"] != "celery" and not (job.folder / "lease").is_dir():
            return _quarantine_here(folders, job)
        from nstd.distributed.lease import Lease, current

        # Workers run jobs while no intake does: only the job's lease makes it ours to move.
        try:
            held = Lease.acquire(job.folder, "nstd-cancel", cfg["queue"]["lease_seconds"])
        except OSError as exc:
            raise NstdError(f"cannot take the lease of {job.name} ({exc.strerror or exc}); is a worker running it?") from None
        if held is not None:
            try:
                from nstd.daemon.store import Store

                Store(folders).reclaim(job.id)  # a dead worker's unfinished move, back into state first
                return _quarantine_here(folders, job)
            finally:
                held.release()
        try:
            holder = current(job.folder)
        except OSError:
            holder = None
    finally:
        lock.release()
    who = f"its worker {holder.holder}" if holder else "its worker"
    return _ask_the_daemon(folders, job, wait_seconds, who)


def _cancel_in_inbox(folders, sidecar: str, wait_seconds: float) -> Said:
    """A job still in the inbox (waiting for an input, say): the intake, the only one that moves
    inbox files, quarantines it as cancelled at its next look, or at its next start."""
    from nstd.daemon.lock import RootLock

    name = sidecar.rsplit(".", 1)[0]
    ask_inbox(folders.state, sidecar)
    if not RootLock.held(folders.state):
        return Said("asked", name, "", f"asked the daemon to cancel {name} ({sidecar} in the inbox); no daemon is "
                    "running: it is cancelled when one starts, before it is taken (or take the job file out yourself)")
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline and os.path.lexists(folders.inbox / sidecar):
        time.sleep(0.2)
    if os.path.lexists(folders.inbox / sidecar):
        return Said("asked", name, "", f"asked the daemon to cancel {name} ({sidecar} in the inbox); it does so at its "
                    "next look at the inbox")
    where = quarantined_as(folders.quarantine, Claimed("", name, folders.inbox), sidecar=sidecar)
    if where is None:
        return Said("finished", name, "", f"{name} left the inbox before the cancel reached it (taken: nstd status)")
    return Said("cancelled", name, "", f"cancelled {name}: moved to {where}", str(where))


def _ask_the_daemon(folders, job: Claimed, wait_seconds: float, who: str = "the daemon") -> Said:
    ask(folders.state, job.id)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if not job.folder.exists():
            break
        time.sleep(0.2)
    else:
        return Said("asked", job.name, job.id, f"asked {who} to cancel {job.name} ({job.id}); it stops at its next "
                    "step and moves the job to quarantine ('nstd status' shows when)")
    where = quarantined_as(folders.quarantine, job)
    if where is not None:
        return Said("cancelled", job.name, job.id, f"cancelled {job.name}: moved to {where}", str(where))
    return Said("finished", job.name, job.id, f"{job.name} finished before the cancel reached it (see the outbox, "
                "or the quarantine)")


def quarantined_as(quarantine: Path, job: Claimed, sidecar: str | None = None) -> Path | None:
    """The quarantine folder whose error.yaml says this very job was cancelled, if any (the
    folders named after the job are read; a name taken earlier gets a suffix). A job cancelled
    in the inbox had no id yet: its job file `sidecar` in the folder tells it."""
    from nstd.daemon.transfer import safe_component

    stem = safe_component(job.name)
    for d in sorted(quarantine.glob(f"{glob.escape(stem)}*"), key=lambda d: d.name):
        try:
            text = safefs.read_bounded(quarantine, f"{d.name}/error.yaml", MAX_ERROR_TEXT).decode("utf-8", "replace")
        except (OSError, safefs.Refused, ValueError):
            continue
        this = (d / sidecar).is_file() if sidecar is not None else f"id: {job.id}" in text
        if this and "kind: cancelled" in text:
            return d
    return None


#: error.yaml's head, where id and kind are written
MAX_ERROR_TEXT = 4096


def _quarantine_here(folders, job: Claimed) -> Said:
    """No daemon runs and we hold the lock: move the claimed job to quarantine ourselves."""
    from nstd.daemon.claim import Claim
    from nstd.daemon.outcome import error_record
    from nstd.daemon.store import Store

    if not job.folder.exists():
        raise NoSuchJob(f"{job.name} is no longer claimed")
    claim = Claim.from_folder(job.folder)
    error = error_record(claim.name, cancelled_error(Stage.QUEUE, " while no daemon ran"), claim.attempts,
                         {"claimed": claim.times.claimed, "failed": time.time()}, claim.id)
    log = claim.log_path.read_text(encoding="utf-8", errors="replace") if claim.log_path.exists() else ""
    final = Store(folders).quarantine_claimed(claim, error, log)
    return Said("cancelled", claim.name, claim.id, f"cancelled {claim.name}: moved to {final}", str(final))
