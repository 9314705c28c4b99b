"""`nstd worker`: one GPU of the cluster, as a Celery worker (concurrency 1, the solo pool).

For each message it takes the best job nobody holds from the shared state folder, leases it,
and runs it with the same Worker, Outcomes and Store as `nstd run` (the same decode, budget fit,
out-of-memory ladder, checkpoints and crash-safe moves), then delivers it and only then
acknowledges the message. Every move of the job's files is fenced by the lease: a worker that
lost its lease (it stalled past `queue.lease_seconds` and another took the job) stops at its next
step and touches nothing more. A worker killed mid-job leaves its lease to expire; the job runs
again elsewhere, its attempt counted, from its last checkpoint, after rolling back the dead
worker's unfinished delivery if there was one.

Its record, `state/workers/<name>.json` (host, device, current job, heartbeat), is what
`nstd status` lists.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from loguru import logger

from nstd import logs
from nstd.daemon.hooks import Hooks
from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import RETRY_SECONDS
from nstd.distributed import board, lease
from nstd.errors import NstdError, Stage
from nstd.state import requests
from nstd.state.claim import Claim
from nstd.state.folders import Folders
from nstd.state.live import Live
from nstd.state.status import Status, pid_alive, read_status
from nstd.state.store import Store

WORKERS = "workers"
#: How often a cancel request is looked for while a job runs (a stat on the shared storage).
CANCEL_CHECK_SECONDS = 0.5


class LeaseLost(BaseException):
    """This worker no longer holds the job. A BaseException on purpose: no `except Exception` on
    the way (the worker's, the finisher's) may turn it into a quarantine or a retry of a job that
    is someone else's now; it unwinds to the node, which lets the job go."""


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{device.replace(':', '')}"


def record_path(state: Path, name: str) -> Path:
    return state / WORKERS / f"{name}.json"


class NodeQueue:
    """What the Worker and Outcomes ask of a queue, for the one job this node holds."""

    def __init__(self, node: "Node"):
        self.node = node
        #: (job id, asked to cancel, monotonic time of the next look) for the job being run
        self._cancel = ("", False, 0.0)

    def put(self, job: Claim, not_before: float = 0.0) -> None:
        """A retry later (nstd failed to move the job): it stays in state, held until then, and
        the lease is let go so that any worker may take it when the time comes."""
        held = self.node.lease
        if held is None or not held.held():
            logger.bind(job=job.name).warning("not retried here: this worker's lease on it was lost")
            return
        wait = max(0.0, not_before - time.monotonic()) if not_before else RETRY_SECONDS
        job.give_back_attempt()  # nstd failed to move it: that is not a crash the job caused
        board.hold(job.folder, wait, "nstd could not finish it")
        held.release()

    def hold(self, job: Claim, seconds: float, reason: str) -> None:
        """Not now (the worker said why: no room on disk): held on the board with the reason,
        for any worker once the time is up; no attempt was counted."""
        held = self.node.lease
        if held is None or not held.held():
            return
        board.hold(job.folder, seconds, reason)
        held.release()

    def done(self, job_id: str) -> None:
        self._cancel = ("", False, 0.0)

    def is_cancelled(self, job_id: str) -> bool:
        """A cancel request for this very job (state/cancel/<id>), looked for twice a second."""
        seen_for, asked, next_look = self._cancel
        now = time.monotonic()
        if seen_for != job_id or (not asked and now >= next_look):
            asked = (self.node.folders.state / requests.REQUESTS / job_id).exists()
            self._cancel = (job_id, asked, now + CANCEL_CHECK_SECONDS)
        return asked

    def lost(self, job_id: str) -> bool:
        """Cheap, every step: the heartbeat found the lease gone."""
        return self.node.lost.is_set()

    def owns(self, job_id: str) -> bool:
        """Before a checkpoint: the lease, read now (a worker that stalled must not write into a
        job another worker runs)."""
        held = self.node.lease
        return held is not None and not self.node.lost.is_set() and held.held()

    def names(self) -> list[str]:
        return []


class FencedStore(Store):
    """The Store, with every move of a claimed job's files behind the node's lease: checked when
    a delivery or quarantine starts, before each file and before the commit; and each lease's
    moves in folders of their own (`.nstd-tx-<id>-L<lease>`), which a new holder renames away
    before it rolls them back."""

    def __init__(self, folders: Folders, node: "Node"):
        super().__init__(folders)
        self.node = node

    def fence(self) -> None:
        self.node.fence()

    def move_tag(self, job: Claim) -> str:
        held = self.node.lease
        return f"{job.id}-L{held.number}" if held is not None else job.id


class Node:
    """The engine, the outcomes and the lease of one `nstd worker` process."""

    def __init__(self, cfg: dict, device: str, name: str, engine_factory: Callable | None = None):
        from nstd.daemon.worker import Worker
        from nstd.engine import Engine

        self.cfg, self.name = cfg, name
        self.folders = Folders.from_config(cfg)
        for folder in (self.folders.state, self.folders.jobs, self.folders.outbox, self.folders.quarantine):
            if not folder.is_dir():  # never made here: an unmounted share would fill the local disk
                raise NstdError(f"{folder} is not there: mount the storage the intake shares (the same paths on "
                                "every machine) and start `nstd run` there once (docs/distributed.md)")
        self.lease: lease.Lease | None = None
        self.lost = threading.Event()
        self.stopping = threading.Event()
        self.path = record_path(self.folders.state, name)
        self._refuse_a_twin()
        self.status = Status(self.folders.state, path=self.path)
        self.store = FencedStore(self.folders, self)
        self.queue = NodeQueue(self)
        self.hooks = Hooks(cfg)
        self.hooks.start()
        self.outcomes = Outcomes(cfg, self.store, self.status, self.queue, self.hooks, Live())
        self.worker = Worker(cfg, device, self.queue, self.store, self.status, engine_factory=engine_factory or Engine,
                             outcomes=self.outcomes)
        self.worker.label = f" (worker {name} on {socket.gethostname()})"
        engine = self.worker.engine
        self.status.data.update(name=name, host=socket.gethostname(), device=str(engine.device),
                                device_name=engine.device.name, precision=engine.precision, state="idle", job=None)
        self.status.update(force=True)
        self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._beat.start()

    def _refuse_a_twin(self) -> None:
        """Two live processes writing one record would show as one worker: refuse the second."""

        other = read_status(self.path.parent, self.path.name) if self.path.exists() else None
        if other is None or other.get("state") == "stopped":
            return
        fresh = time.time() - other["updated_at"] < self.cfg["queue"]["lease_seconds"]
        if other.get("host") == socket.gethostname():  # a killed worker restarts at once
            twin = fresh and other["pid"] != os.getpid() and pid_alive(other["pid"])
        else:
            twin = fresh
        if twin:
            raise NstdError(f"a worker called {self.name!r} is running (pid {other.get('pid')} on {other.get('host')}, "
                            f"heard from {time.time() - other['updated_at']:.0f} s ago): give this one another --name")

    # ------------------------------------------------------------------ the lease

    def fence(self) -> None:
        """Before a move of the job's files: still ours, or LeaseLost."""
        if self.lease is None or self.lost.is_set() or not self.lease.held():
            self.lost.set()
            raise LeaseLost()

    def _heartbeat(self) -> None:
        every = min(5.0, self.cfg["queue"]["lease_seconds"] / 4)
        while True:
            held = self.lease
            if held is not None and not self.lost.is_set() and not held.renew():
                if self.lease is held:
                    self.lost.set()
                    logger.warning("the lease on {} was lost (another worker took the job): stopping it at the next step",
                                   held.job_dir.name)
            if held is None:
                board.observe(self.folders.jobs)  # idle: watch the other leases, to judge them when a message comes
            if self.stopping.is_set() and self.status.data.get("state") not in ("stopping", "stopped"):
                self.status.update(state="stopping")
            self.status.update(force=True, heartbeat_at=time.time())
            time.sleep(every)

    @contextmanager
    def holding(self, held: lease.Lease) -> Iterator[None]:
        self.lost.clear()
        self.lease = held
        try:
            yield
        finally:
            self.lease = None
            held.release()

    # ------------------------------------------------------------------ a message

    def begin_stop(self) -> None:
        """Celery's warm shutdown (SIGTERM): the running job gets shutdown_grace_seconds, then stops
        at a step with a checkpoint and is given back."""
        # Called inside Celery's signal handler, on the thread that may hold the status's lock
        # mid-write: set flags only; the heartbeat thread writes the state.
        if not self.stopping.is_set():
            self.worker.begin_stop(self.cfg["service"]["shutdown_grace_seconds"])
            self.stopping.set()

    def run_next(self, hint: str | None = None) -> str:
        """One message: run the best job nobody holds. Returns what happened, for the log."""
        ls = self.cfg["queue"]["lease_seconds"]
        for entry in board.takeable(self.folders.jobs, ls):
            if self.stopping.is_set():
                return "stopping"
            log = logger.bind(job=entry.name, job_id=entry.id)
            try:
                held = lease.Lease.acquire(entry.folder, self.name, ls)
            except OSError as exc:  # a lease folder nstd cannot write (permissions, a full disk)
                log.error("cannot take the lease on this job ({}); leaving it for now", exc)
                continue
            if held is None:
                continue  # another worker was quicker
            try:
                with self.holding(held):
                    try:
                        outcome = self.take(entry)
                    except Exception as exc:  # a full disk, a bug: the job waits, the worker goes on
                        log.opt(exception=exc).error("could not take the job ({}); it waits {:g} s", exc, RETRY_SECONDS)
                        if held.held():
                            _give_back_attempt(entry)  # nstd's failure, not a crash the job caused
                            board.hold(entry.folder, RETRY_SECONDS, f"{type(exc).__name__}: {exc}")
                        outcome = "failed; held for a retry"
            except LeaseLost:
                log.warning("let go: another worker holds it now")
                outcome = "lease lost"
            except OSError as exc:  # the hold itself could not be written: the lease ends, the job waits
                log.error("could not hold the job for a retry either ({})", exc)
                outcome = "failed"
            finally:
                self.status.update(force=True, state="stopping" if self.stopping.is_set() else "idle", job=None)
            if outcome is not None:
                return outcome
        return "nothing to take" + (f" ({hint} is held or done)" if hint else "")

    def take(self, entry: board.Entry) -> str | None:
        """Run one leased job; None when it turned out to be finished already."""
        log = logger.bind(job=entry.name, job_id=entry.id)
        self.fence()  # the lease just taken is the newest (a listing can lag on NFS)
        restored = self.store.reclaim(entry.id)
        if restored:  # a dead or stalled worker's delivery: the inputs are back in state
            log.warning("rolled back the unfinished move of a worker that stopped ({} file(s) put back)", restored)
        inputs = entry.folder / "inputs"
        if not inputs.is_dir() or not any(inputs.iterdir()):
            shutil.rmtree(entry.folder, ignore_errors=True)  # delivered: only nstd's own files were left
            return None
        job = Claim.from_folder(entry.folder)
        board.unhold(entry.folder)
        self.status.update(force=True, state="running", job=job.name)
        try:
            if self.queue.is_cancelled(job.id):
                log.warning("cancelled while queued (nstd cancel)")
                self.outcomes.quarantine(job, requests.cancelled_error(Stage.QUEUE))
            elif not self.outcomes.crashed_too_often(job, "workers"):
                self.worker.process(job)
        finally:
            self.queue.done(job.id)
        if not job.folder.exists() and (self.folders.state / requests.REQUESTS / job.id).exists():
            requests.answered(self.folders.state, job.id)
        return f"took {job.name}"

    def close(self) -> None:
        self.hooks.close(timeout=self.cfg["hooks"]["timeout_seconds"])
        self.status.update(force=True, state="stopped", job=None, running=None)


def _give_back_attempt(entry: board.Entry) -> None:
    """Undo the attempt counted for a run that failed for a reason of nstd's."""
    try:
        job = Claim.from_folder(entry.folder)
        if job.attempts > entry.attempts:
            job.attempts = entry.attempts
            job.save()
    except (OSError, ValueError, KeyError, TypeError):
        pass


def serve(cfg: dict, device: str | None, name: str | None, loglevel: str = "INFO") -> int:
    """`nstd worker`: load the network, then consume the cluster's queue until SIGTERM."""
    from celery import signals

    from nstd.distributed.broker import TASK, Broker, make_app, redact, skew_problem

    device = device or cfg["engine"]["device"]
    name = name or default_name(device)
    folders = Folders.from_config(cfg)
    logs.setup(cfg["logging"], folders.logs if folders.logs.is_dir() else None, filename=f"worker-{name}.log")
    broker = Broker(cfg)
    try:
        problem = skew_problem(broker.clock_skew(), cfg["queue"]["lease_seconds"])
    except Exception:
        problem = None  # Redis not up yet: Celery waits for it; the intake checks the clocks every 5 min
    finally:
        broker.close()
    if problem:
        logger.warning("{}", problem)
    node = Node(cfg, device, name)
    logger.info("worker {}: network {} loaded on {} ({}); consuming queue {!r} at {}", name, cfg["engine"]["weights"],
                node.worker.engine.device, node.worker.engine.precision, cfg["queue"]["name"], redact(cfg["queue"]["broker"]))
    app = make_app(cfg)

    @app.task(name=TASK)
    def run_next(hint: str | None = None) -> str:
        outcome = node.run_next(hint)
        logger.debug("message for {}: {}", hint, outcome)
        return outcome

    signals.worker_shutting_down.connect(lambda **_: node.begin_stop(), weak=False)
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={cfg['queue']['name']}",
                         f"--hostname={name}@%h", "--prefetch-multiplier=1", "--without-gossip", "--without-mingle",
                         "--without-heartbeat", f"--loglevel={'INFO' if loglevel == 'DEBUG' else loglevel}"])
    finally:
        node.close()
    return 0
