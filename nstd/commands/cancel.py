"""`nstd cancel NAME`: a queued job to quarantine as "cancelled", a running one stopped at its next step.

With a daemon running, the command leaves a request, `state/cancel/<job id>`, that the intake
loop reads within a tick (the daemon owns its queue and its worker; no second process touches
them). With none running, the command takes the root's lock itself, so no daemon can start
meanwhile, and moves the claimed job to quarantine. Either way the job's files are moved, never
deleted.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nstd import logs
from nstd.commands.base import config_of, one_line
from nstd.distributed.lease import Lease, current
from nstd.errors import ExitCode, NstdError, Stage
from nstd.job.file import SIDECAR_SUFFIXES
from nstd.state import safefs
from nstd.state.claim import Claim, Claimed, NoSuchJob, find
from nstd.state.folders import Folders
from nstd.state.lock import AlreadyRunning, RootLock
from nstd.state.requests import ask, ask_inbox, cancelled_error
from nstd.state.store import Store
from nstd.state.transfer import safe_component


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
            return _quarantine_here(cfg, folders, job)

        # Workers run jobs while no intake does: only the job's lease makes it ours to move.
        try:
            held = Lease.acquire(job.folder, "nstd-cancel", cfg["queue"]["lease_seconds"])
        except OSError as exc:
            raise NstdError(f"cannot take the lease of {job.name} ({exc.strerror or exc}); is a worker running it?") from None
        if held is not None:
            try:
                Store(folders).reclaim(job.id)  # a dead worker's unfinished move, back into state first
                return _quarantine_here(cfg, folders, job)
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


def in_inbox(inbox: Path, name: str) -> str | None:
    """The job file in the inbox that `name` (with or without its suffix) names, if any."""
    if "/" in name or name in ("", ".", ".."):
        return None
    candidates = [name] if name.endswith(SIDECAR_SUFFIXES) else [name + s for s in SIDECAR_SUFFIXES]
    return next((c for c in candidates if os.path.lexists(inbox / c)), None)


def quarantined_as(quarantine: Path, job: Claimed, sidecar: str | None = None) -> Path | None:
    """The quarantine folder whose error.yaml says this very job was cancelled, if any (the
    folders named after the job are read; a name taken earlier gets a suffix). A job cancelled
    in the inbox had no id yet: its job file `sidecar` in the folder tells it."""
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


def _quarantine_here(cfg: dict, folders: Folders, job: Claimed) -> Said:
    """No daemon runs and we hold the lock: the job ends through Outcomes as the daemon's would
    (its line in logs/nstd.log, its hook, run here; no daemon's counts to add to)."""
    from nstd.daemon.outcome import Outcomes  # torch: only where a job is moved here

    if not job.folder.exists():
        raise NoSuchJob(f"{job.name} is no longer claimed")
    claim = Claim.from_folder(job.folder)
    logs.setup(cfg["logging"], folders.logs, stderr=False)  # the command says it in its own line
    final = Outcomes(cfg, Store(folders), None, None).quarantine(
        claim, cancelled_error(Stage.QUEUE, " while no daemon ran"))
    return Said("cancelled", claim.name, claim.id, f"cancelled {claim.name}: moved to {final}", str(final))


def main(args: argparse.Namespace) -> int:
    try:
        said = cancel(config_of(args, required=True), args.name, args.wait)
    except OSError as exc:
        raise NstdError(f"cancel {args.name}: {exc.strerror or exc} ({exc.filename or 'a folder'})") from None
    if args.json:
        print(json.dumps({"outcome": said.outcome, "job": said.job, "id": said.id, "where": said.where,
                          "message": said.line}, indent=1))
    else:
        print(one_line(said.line))
    return ExitCode.PENDING if said.outcome == "asked" else ExitCode.OK
