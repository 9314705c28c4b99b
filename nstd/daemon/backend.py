"""The seam between the intake and whoever runs the jobs: this machine's workers (LocalBackend,
here) or `nstd worker`s on other machines (nstd/distributed/backend.py, ClusterBackend).

The daemon asks a backend four things: which devices this process runs jobs on, whether the root
may be run this way (`check_root`), which claimed jobs found in state to queue (`recover`), and
to act on a cancel request; it puts claimed jobs into `backend.queue`. The command that starts the
daemon (nstd/commands/run.py) picks the backend, so the daemon imports no cluster code.
"""
from __future__ import annotations

from typing import Callable, Protocol

from loguru import logger

from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import JobQueue
from nstd.engine.device import Device
from nstd.engine.device import resolve as resolve_device
from nstd.engine.device import resolve_all
from nstd.errors import Stage
from nstd.state import requests
from nstd.state.claim import Claim
from nstd.state.folders import Folders
from nstd.state.store import Store


class Backend(Protocol):
    """What the daemon needs of whoever runs its claimed jobs."""

    name: str
    #: claimed jobs go here: the daemon calls put, names, busy and len (a JobQueue here; a
    #: ClusterQueue, nstd/distributed/dispatch.py, for the cluster)
    queue: JobQueue

    def devices(self) -> list[Device]:
        """The devices this process runs jobs on (none: the jobs run elsewhere)."""

    def check_root(self, folders: Folders) -> None:
        """Raise NstdError when this root must not be run this way; called holding the root's lock."""

    def recover(self, store: Store) -> list[Claim]:
        """Claimed jobs found in state after a restart, for this process's workers to queue."""

    def start(self, store: Store, outcomes: Outcomes) -> None:
        """Begin handing out jobs (after recovery, before the workers start)."""

    def cancel(self, job_id: str) -> None:
        """Act on `nstd cancel`'s request for a claimed job (state/cancel/<id>), once a tick until answered."""

    def runner(self) -> str:
        """Who runs the jobs, for the status file when no device of ours does."""

    def close(self) -> None:
        """Stop handing out jobs (at shutdown)."""

    def reconfigure(self, cfg: dict) -> None:
        """A reloaded configuration (queue timings, limits), for the next job."""


class LocalBackend:
    """`queue.backend: local`: one worker thread a device of this machine, fed by an in-process queue."""

    name = "local"

    def __init__(self, cfg: dict, root_check: Callable[[Folders], None] | None = None):
        """`root_check`: what else makes a root unfit for local work (a cluster at work on it,
        nstd/distributed/backend.py), given by the command that starts the daemon."""
        self.cfg = cfg
        self.queue = JobQueue()
        self._root_check = root_check
        #: cancel requests acted on that could not be removed: not acted on again every tick
        self._stuck: set[str] = set()

    def devices(self) -> list[Device]:
        return resolve_all(self.cfg["gpu"]["devices"]) or [resolve_device(self.cfg["engine"]["device"])]

    def check_root(self, folders: Folders) -> None:
        if self._root_check is not None:
            self._root_check(folders)

    def recover(self, store: Store) -> list[Claim]:
        return store.recover(cluster=False)

    def start(self, store: Store, outcomes: Outcomes) -> None:
        self.state, self.outcomes = store.f.state, outcomes

    def runner(self) -> str:
        return "this process"

    def close(self) -> None:
        pass

    def reconfigure(self, cfg: dict) -> None:
        self.cfg = cfg

    def cancel(self, job_id: str) -> None:
        """A queued job goes to quarantine now; a running one stops at its next step (its worker
        reads the request and quarantines it)."""
        if job_id in self._stuck:
            return
        if not requests.answered(self.state, job_id):
            self._stuck.add(job_id)  # acted on once; not again every tick
            logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", requests.REQUESTS, job_id)
        where, job = self.queue.cancel(job_id)
        if job is not None:
            logger.bind(job=job.name, job_id=job.id).warning("cancelled while queued (nstd cancel)")
            try:
                self.outcomes.quarantine(job, requests.cancelled_error(Stage.QUEUE))
            except OSError as exc:
                self.outcomes.retry_later(job, exc)
        elif where == "running":
            logger.info("cancelling the running job {} at its next step (nstd cancel)", job_id)
        else:
            logger.warning("nstd cancel {}: no such job is queued or running (finished meanwhile?)", job_id)

