"""How a job ends: delivered to the outbox, quarantined with error.yaml, or tried again later.

Every quarantine (from the inbox or from state) and every error.yaml is decided here (the store
writes the files), and so is
every output of a finished job (the result, the GIF, job.yaml, report.json). A finisher thread
encodes and delivers while the worker optimises the next job.
"""
from __future__ import annotations

import dataclasses
import io
import json
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from loguru import logger

from nstd import logs, yamltext
from nstd.daemon.hooks import Hooks
from nstd.daemon.queue import RETRY_SECONDS, JobQueue, retry_at
from nstd.engine import Result, images
from nstd.errors import ErrorKind, JobError, Stage
from nstd.job.spec import Job
from nstd.report import run_fields
from nstd.state.claim import Claim
from nstd.state.live import Live
from nstd.state.status import Status
from nstd.state.store import Store
from nstd.state.transfer import safe_component
from nstd.timetext import iso


@dataclasses.dataclass
class Optimised:
    """A job whose picture is made: what the finisher needs to encode, report and deliver it."""

    job: Claim
    spec: Job  # its keys, typed
    result: Result
    size_requested: int
    timings: dict[str, float]
    oom_retries: int
    cpu_fallback: bool
    style_cache: dict[str, int]
    peak_rss_bytes: int
    budget_bytes: int | None = None  # the memory budget the stages were fitted to (GPU or CPU)


def error_record(name: str, exc: JobError, attempts: int, times: dict[str, float], job_id: str | None = None) -> dict:
    """error.yaml: stage, kind, message, attempts and times (local time with offset); a claimed
    job's id (the one `nstd cancel` knows it by)."""
    return {"job": name, **({"id": job_id} if job_id else {}), "stage": exc.stage.value, "kind": exc.kind.value,
            "message": exc.message, "attempts": attempts, "times": {k: iso(v) for k, v in times.items()}}


class Outcomes:
    """The one place a job's end is decided and written."""

    def __init__(self, cfg: dict, store: Store, status: Status | None, jobs: JobQueue | None,
                 hooks: Hooks | None = None, live: Live | None = None):
        """`status` None: no daemon's counts to add to (`nstd cancel` with no daemon running);
        `jobs` None: nothing to retry later into (the caller retries)."""
        self.cfg, self.store, self.status, self.queue = cfg, store, status, jobs
        self.hooks = hooks or Hooks(cfg)  # not started: hooks run inline (a worker driven by hand)
        self.live = live or Live()

    # ------------------------------------------------------------------ failures

    def quarantine_inbox(self, name: str, sidecar: Path, files: list[Path], shared: set[Path], exc: JobError,
                         seen: float, log_text: str) -> Path:
        """A job judged before its claim. Raises OSError (rolled back) when it cannot be written."""
        error = error_record(name, exc, 0, {"seen": seen, "failed": time.time()})
        final = self.store.quarantine_from_inbox(name, sidecar, files, shared, error, log_text)
        self._ended(name, final, exc)
        return final

    def quarantine(self, job: Claim, exc: JobError) -> Path:
        """A claimed job that cannot be done, or is cancelled: its quarantine folder. Raises
        OSError when quarantine cannot be written."""
        error = error_record(job.name, exc, job.attempts, {"claimed": job.times.claimed, "failed": time.time()}, job.id)
        text = job.log_path.read_text(encoding="utf-8", errors="replace") if job.log_path.exists() else ""
        final = self.store.quarantine_claimed(job, error, text)
        self._ended(job.name, final, exc)
        return final

    def _ended(self, name: str, final: Path, exc: JobError) -> None:
        """Every quarantine's log line, count and hook."""
        logger.bind(job=name).warning("quarantined in {}: {}", final, exc.message)
        if self.status is not None:
            self.status.count_quarantined(exc.kind.value)
        self.hooks.failed(name, str(final), exc.kind.value, exc.message)

    def crashed_too_often(self, job: Claim, who: str) -> bool:
        """The crash-loop rule: a job during which `who` ("the daemon", "workers") stopped
        queue.max_attempts times is quarantined as crashed instead of run again (True)."""
        limit = self.cfg["queue"]["max_attempts"]
        if job.attempts < limit:
            return False
        self.quarantine(job, JobError(ErrorKind.CRASHED, f"{who} stopped during this job {job.attempts} times "
                                      f"(queue.max_attempts={limit})", Stage.RUN))
        return True

    def internal_error(self, job: Claim, exc: Exception, stage: Stage) -> None:
        """A bug or an engine/encoder failure: quarantine the job with the traceback in its log."""
        logger.bind(job=job.name, job_id=job.id).error("internal error: {}\n{}", exc, traceback.format_exc())
        self.quarantine(job, JobError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", stage))

    def retry_later(self, job: Claim, exc: Exception) -> None:
        """A job that failed for a reason of nstd's, not the user's: log it and queue it again
        (without a queue, as `nstd cancel` has none: `exc` is the caller's)."""
        if self.queue is None:
            raise exc
        logger.bind(job=job.name).opt(exception=exc).error("could not finish the job ({}); retrying in {:g} s",
                                                           exc, RETRY_SECONDS)
        self.queue.put(job, not_before=retry_at())

    # ------------------------------------------------------------------ success

    def finish(self, done: Optimised) -> None:
        """On the finisher thread: encode, report and deliver one optimised job."""
        job = done.job
        log = logger.bind(job=job.name, job_id=job.id)
        with logs.job_file(job.id, job.log_path):
            try:
                outputs = self.encode(done)
            except Exception as exc:  # an encoder failure quarantines the job, the daemon goes on
                self.internal_error(job, exc, Stage.ENCODE)
                return
            log.info("finished; writing to the outbox")
        outputs["job.log"] = job.log_path.read_bytes()
        try:
            final = self.store.deliver(job, outputs)
        except OSError as exc:
            self._deliver_failed(job, exc)
            return
        logger.bind(job=job.name).info("delivered to {}", final)
        self.status.count("done")
        if job.times.started:
            self.live.job_done(time.time() - job.times.started[-1])
        self.hooks.done(job.name, str(final), str(final / next(iter(outputs))))

    def _deliver_failed(self, job: Claim, exc: OSError) -> None:
        """The outbox could not be written (the transfer was rolled back): quarantine with the
        reason, or if that cannot be written either, keep the job in state and retry later."""
        reason = f"cannot write the outbox: {exc.strerror or exc} ({getattr(exc, 'filename', '') or self.store.outbox})"
        with logs.job_file(job.id, job.log_path):
            logger.bind(job=job.name, job_id=job.id).error(reason)
        try:
            self.quarantine(job, JobError(ErrorKind.CANNOT_WRITE_OUTBOX, reason, Stage.DELIVER))
        except OSError as exc2:
            logger.bind(job=job.name).error("cannot write quarantine either ({}); the job stays queued and is "
                                            "retried in {:g} s", exc2.strerror or exc2, RETRY_SECONDS)
            self.queue.put(job, not_before=retry_at())

    def encode(self, done: Optimised) -> dict[str, bytes]:
        """The result, the GIF, job.yaml and report.json, as bytes for the outbox."""
        t_start = time.time()
        job, result, spec = done.job, done.result, done.spec
        fmt = spec.output.format
        stem = safe_component(job.name)
        outputs = {f"{stem}.{fmt}": images.encode(result.image, fmt, spec.output.quality, result.image16)}
        if spec.gif and result.frames:
            buf = io.BytesIO()
            images.save_gif_to(result.frames, buf, spec.gif.fps)
            outputs[f"{stem}.gif"] = buf.getvalue()
        encoded = time.time() - t_start
        effective = {"content": job.content.origin,
                     "style": [{"path": s.origin, "weight": s.weight, **({"mask": s.mask.origin} if s.mask else {})}
                               for s in job.styles],
                     **({"keep": job.keep.origin} if job.keep else {}), **spec.settings}
        outputs["job.yaml"] = yamltext.dump(effective).encode()
        outputs["report.json"] = json.dumps(self.report(done, encoded), indent=1).encode()
        return outputs

    def report(self, done: Optimised, encoded: float) -> dict:
        spec = done.spec
        return {
            "job": done.job.name,
            "status": "done",
            "attempts": done.job.attempts,
            "timings": {**done.timings, "encoded": round(encoded, 3)},  # encoded: result + GIF
            **run_fields(done.result, spec.steps),
            "preserve_color": spec.preserve_color,
            "size_requested": done.size_requested,
            "oom_retries": done.oom_retries,
            "cpu_fallback": done.cpu_fallback,
            "peak_rss_bytes": done.peak_rss_bytes,
            "memory_budget_bytes": done.budget_bytes,
            "style_cache": done.style_cache,
            "weights": self.cfg["engine"]["weights"],
        }


class Finisher(threading.Thread):
    """Encodes and delivers finished jobs while the worker optimises the next one.

    One job may wait while one is being finished; a third blocks the worker, so memory stays
    bounded. A crash before delivery loses nothing: the job is still in state and runs again.
    """

    def __init__(self, finish: Callable[[Optimised], None], failed: Callable[[Claim, Exception], None],
                 name: str):
        super().__init__(name=name, daemon=True)
        self._finish, self._failed = finish, failed
        self._q: "queue.Queue[Optimised | None]" = queue.Queue(maxsize=1)

    def submit(self, done: Optimised) -> None:
        """Hand a job over; without a running finisher thread (a worker driven by hand), finish it here."""
        if self.is_alive():
            self._q.put(done)
        else:
            self._finish_one(done)

    def close(self) -> None:
        """Finish what was handed over, then end the thread."""
        if self.is_alive():
            self._q.put(None)
            self.join()

    def idle(self) -> bool:
        """Nothing handed over is still being finished."""
        return self._q.unfinished_tasks == 0

    def run(self) -> None:
        while (done := self._q.get()) is not None:
            try:
                self._finish_one(done)
            finally:
                self._q.task_done()

    def _finish_one(self, done: Optimised) -> None:
        try:
            self._finish(done)
        except Exception as exc:  # the finisher must outlive any job; the job stays in state
            self._failed(done.job, exc)
