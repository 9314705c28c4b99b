"""`queue.backend: celery` behind the daemon's seam (nstd/daemon/backend.py): the intake claims
jobs onto the board in state, a dispatcher keeps a message queued for each, and `nstd worker`s
elsewhere lease and run them. Also the local backend's root check: no cluster may be at work on
a root that `queue.backend: local` runs."""
from __future__ import annotations

import time

from loguru import logger

from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import RETRY_SECONDS
from nstd.distributed import board, lease
from nstd.distributed.broker import redact
from nstd.distributed.dispatch import ClusterQueue, Dispatcher
from nstd.engine.device import Device
from nstd.errors import NstdError, Stage
from nstd.state import requests
from nstd.state.claim import Claim
from nstd.state.folders import Folders
from nstd.state.status import workers as worker_records
from nstd.state.store import Store


class ClusterBackend:
    """The jobs run on `nstd worker`s; this process only takes them in, dispatches and cancels."""

    name = "celery"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        try:
            self.dispatcher = Dispatcher(cfg, Folders.from_config(cfg).jobs)
        except ImportError as exc:  # celery, redis: the distributed extra
            raise NstdError(f"queue.backend celery needs the distributed extra ({exc}): "
                            "pip install 'nstd[distributed]'") from None
        self.queue = ClusterQueue(self.dispatcher)
        #: cancels of running jobs left to their workers: said once
        self._left: set[str] = set()
        #: cancels that failed: not tried again before this (monotonic)
        self._retry_at: dict[str, float] = {}

    def devices(self) -> list[Device]:
        return []  # the workers' machines have the GPUs

    def check_root(self, folders: Folders) -> None:
        pass

    def recover(self, store: Store) -> list[Claim]:
        store.recover(cluster=True)
        return []  # on the board already: the dispatcher sends them, the workers judge their attempts

    def start(self, store: Store, outcomes: Outcomes) -> None:
        self.store, self.outcomes, self.folders = store, outcomes, store.f
        self.dispatcher.start()

    def runner(self) -> str:
        return f"nstd worker processes (queue {self.cfg['queue']['name']!r} at {redact(self.cfg['queue']['broker'])})"

    def close(self) -> None:
        self.dispatcher.close()

    def reconfigure(self, cfg: dict) -> None:
        self.cfg = self.dispatcher.cfg = cfg

    def cancel(self, job_id: str) -> None:
        """A job nobody holds is leased here and quarantined; a running one's request is left for
        its worker, which stops it at its next step and removes the request."""
        if time.monotonic() < self._retry_at.get(job_id, 0.0):
            return
        try:
            self._cancel(job_id)
        except Exception as exc:  # a lease folder nstd cannot read, say: never the intake's end
            logger.error("cannot cancel {} now ({}); trying again in {:g} s", job_id, exc, RETRY_SECONDS)
            self._retry_at[job_id] = time.monotonic() + RETRY_SECONDS

    def _cancel(self, job_id: str) -> None:
        folder = self.folders.jobs / job_id
        if not folder.is_dir():
            if requests.answered(self.folders.state, job_id):
                logger.warning("nstd cancel {}: no such job is queued or running (finished meanwhile?)", job_id)
            else:
                logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", requests.REQUESTS, job_id)
                self._retry_at[job_id] = float("inf")
            return
        held = lease.Lease.acquire(folder, "intake", self.cfg["queue"]["lease_seconds"])
        if held is None:
            if job_id not in self._left:
                cur = lease.current(folder)
                logger.info("cancelling {}: its worker {} stops it at its next step", job_id, cur.holder if cur else "?")
                self._left.add(job_id)
            return
        try:
            self.store.reclaim(job_id)  # a dead worker's unfinished move, back into state first
            job = Claim.from_folder(folder)
            logger.bind(job=job.name, job_id=job.id).warning("cancelled while queued (nstd cancel)")
            self.outcomes.quarantine(job, requests.cancelled_error(Stage.QUEUE))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("cannot cancel {} now ({}); trying again in {:g} s", job_id, exc, RETRY_SECONDS)
            self._retry_at[job_id] = time.monotonic() + RETRY_SECONDS
            return
        finally:
            held.release()
        self._retry_at.pop(job_id, None)
        self._left.discard(job_id)
        requests.answered(self.folders.state, job_id)


def refuse_a_live_cluster(cfg: dict, folders: Folders) -> None:
    """queue.backend local on a root where `nstd worker`s run: their jobs would run twice, and
    their deliveries be rolled back under them (LocalBackend's root check)."""
    lease_seconds = cfg["queue"]["lease_seconds"]
    now = time.time()
    live = [w["name"] for w in worker_records(folders.state, now)
            if w.get("state") != "stopped" and now - w["updated_at"] < lease_seconds]
    leased = [e.name for e in board.scan(folders.jobs) if e.taken(lease_seconds)]
    if leased and not live:
        # A lease is judged by watching it (nstd/distributed/lease.py): a dead cluster's stop renewing.
        logger.info("jobs held by a worker ({}): watching their leases for up to {:g} s",
                    ", ".join(leased), lease_seconds)
        end = time.monotonic() + lease_seconds + 1
        while leased and time.monotonic() < end:
            time.sleep(0.5)
            leased = [e.name for e in board.scan(folders.jobs) if e.taken(lease_seconds)]
    if live or leased:
        raise NstdError(f"queue.backend is local, but this root has a cluster at work (workers: "
                        f"{', '.join(live) or 'none heard from'}; jobs held by a worker: {', '.join(leased) or 'none'}); "
                        "set queue.backend: celery as the workers have it, or stop them (docs/distributed.md)")
