"""The intake's side of `queue.backend: celery`: keep a message queued for every job a worker could take.

Each tick the dispatcher reads the work list from state (nstd/distributed/board.py) and the queue's
length from Redis, and sends the difference. That one rule covers every way a message goes
missing: a job just claimed, one a dead worker's lease let go, one held for a retry whose time
came, one given back by an orderly stop, and every job after Redis restarted without its data.
A message too many costs a worker one look at the board; a message too few would strand a job,
so the count errs on the side of more (a message a worker has taken and not yet turned into a
lease is sent again). The dispatcher runs on a thread of its own: a slow or absent Redis never
holds up the inbox.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from loguru import logger

from nstd.distributed import board
from nstd.distributed.broker import Broker, redact, skew_problem
from nstd.state.store import drop_state_folder

#: How often the work list and the queue are compared (a claim wakes it at once).
TICK_SECONDS = 1.0
#: How often the intake compares its clock with the broker's.
CLOCK_CHECK_SECONDS = 300.0


class Dispatcher(threading.Thread):
    def __init__(self, cfg: dict, jobs_dir: Path, broker: Broker | None = None):
        super().__init__(name="dispatcher", daemon=True)
        self.cfg, self.jobs_dir = cfg, jobs_dir
        self.broker = broker or Broker(cfg)
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.reachable: bool | None = None
        self._lock = threading.Lock()
        self._entries: list[board.Entry] = []
        self._next_clock_check = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a bug here must not end the intake
                logger.exception("dispatcher: {}", exc)
            self.wake.wait(TICK_SECONDS)
            self.wake.clear()

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=10)
        self.broker.close()

    def tick(self) -> int:
        """Send what is missing; returns how many were sent."""
        entries = board.scan(self.jobs_dir)
        with self._lock:
            self._entries = entries
        takeable = [e for e in entries if e.takeable(self.cfg["queue"]["lease_seconds"])]
        try:
            missing = len(takeable) - self.broker.queued()
            for entry in takeable[:max(0, missing)]:
                self.broker.send(entry.id)
        except Exception as exc:
            if self.reachable is not False:
                logger.error("the broker {} cannot be reached ({}); jobs stay claimed in state and are sent "
                             "when it is back", redact(self.cfg["queue"]["broker"]), f"{type(exc).__name__}: {exc}")
            self.reachable = False
            return 0
        if self.reachable is False:
            logger.info("the broker is back")
        self.reachable = True
        if time.monotonic() >= self._next_clock_check:
            self._next_clock_check = time.monotonic() + CLOCK_CHECK_SECONDS
            self.check_clock()
            for folder in board.leftovers(self.jobs_dir):
                logger.info("removing {}: what was left of a delivered job's state folder", folder.name)
                drop_state_folder(folder)  # never a user's file: one still in inputs/ keeps it
        if missing > 0:
            logger.debug("sent {} message(s) for {} job(s) waiting", missing, len(takeable))
        return max(0, missing)

    def check_clock(self) -> None:
        try:
            problem = skew_problem(self.broker.clock_skew(), self.cfg["queue"]["lease_seconds"])
        except Exception:
            return
        if problem:
            logger.warning("{}", problem)

    def queue_names(self) -> list[str]:
        """Jobs waiting for a worker, best first (status.json's `queue`)."""
        with self._lock:
            return [e.name for e in self._entries if not e.taken(self.cfg["queue"]["lease_seconds"])]



class ClusterQueue:
    """The intake's queue under `queue.backend: celery`: a claimed job is already on the board
    (its state folder); putting it only wakes the dispatcher, or holds it for a retry."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    def put(self, job, not_before: float = 0.0) -> None:
        if not_before:
            board.hold(job.folder, max(0.0, not_before - time.monotonic()), "nstd could not move it")
        self.dispatcher.wake.set()

    def names(self) -> list[str]:
        return self.dispatcher.queue_names()

    def busy(self) -> bool:
        return bool(board.scan(self.dispatcher.jobs_dir))

    def __len__(self) -> int:
        return len(self.dispatcher.queue_names())
