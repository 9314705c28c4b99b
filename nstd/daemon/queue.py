"""The queue of claimed jobs, and the one retry policy for everything nstd itself failed at.

Highest priority first, then the job file that arrived first. A job that failed for a reason of
nstd's, not the user's (a full disk while claiming, delivering or quarantining; a bug), is held
back for `RETRY_SECONDS` and tried again, whether it waits in the inbox or in the queue.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time

from nstd.state.claim import Claim

#: How long a job waits after nstd failed to move or finish it (intake and worker alike).
RETRY_SECONDS = 30.0


def retry_at(now: float | None = None) -> float:
    """The monotonic time before which a job that just failed is not tried again."""
    return (time.monotonic() if now is None else now) + RETRY_SECONDS


class JobQueue:
    """Thread-safe priority queue of claims; an entry may be held back until a monotonic time."""

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        #: ids of jobs a worker took and has not yet handed on
        self._running: set[str] = set()
        #: ids of running jobs asked to stop by `nstd cancel`
        self._cancelled: set[str] = set()

    def put(self, job: Claim, not_before: float = 0.0) -> None:
        """Queue a job; `not_before` (time.monotonic()) holds it back, for a retry after a failure."""
        with self._cond:
            heapq.heappush(self._heap, ((*job.sort_key(), next(self._seq)), not_before, job))
            self._cond.notify()

    def hold(self, job: Claim, seconds: float, reason: str) -> None:
        """Back into the queue, not taken for `seconds` (the worker said why: no room on disk)."""
        self.put(job, not_before=time.monotonic() + seconds)

    def get(self, timeout: float) -> Claim | None:
        with self._cond:
            entry = self._first_ready()
            if entry is None:
                self._cond.wait(timeout)
                entry = self._first_ready()
            if entry is None:
                return None
            self._heap.remove(entry)
            heapq.heapify(self._heap)
            self._running.add(entry[2].id)
            return entry[2]

    def done(self, job_id: str) -> None:
        """A worker is finished with a job it took (whatever became of it)."""
        with self._cond:
            self._running.discard(job_id)
            self._cancelled.discard(job_id)

    def cancel(self, job_id: str) -> tuple[str, Claim | None]:
        """`nstd cancel`: a queued job is taken out and returned ("queued", job) for quarantine; a
        running one is marked, and stops at its next step ("running", None); else ("unknown", None)."""
        with self._cond:
            for entry in self._heap:
                if entry[2].id == job_id:
                    self._heap.remove(entry)
                    heapq.heapify(self._heap)
                    return "queued", entry[2]
            if job_id in self._running:
                self._cancelled.add(job_id)
                return "running", None
            return "unknown", None

    def busy(self) -> bool:
        """A job is queued, or taken by a worker and not yet handed on."""
        with self._cond:
            return bool(self._heap or self._running)

    def is_cancelled(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._cancelled

    def lost(self, job_id: str) -> bool:
        """The job was taken away from this worker (a cluster worker's lease; never here)."""
        return False

    def owns(self, job_id: str) -> bool:
        """This worker may still write into the job's state folder (always, on one machine)."""
        return True

    def _first_ready(self) -> tuple | None:
        if self._heap and self._heap[0][1] <= time.monotonic():
            return self._heap[0]  # the common case: the best job is not held back
        now = time.monotonic()
        return next((e for e in sorted(self._heap, key=lambda e: e[0]) if e[1] <= now), None)

    def names(self) -> list[str]:
        with self._cond:
            return [e[2].name for e in sorted(self._heap, key=lambda e: e[0])]

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)
