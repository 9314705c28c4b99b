"""Intake: a job file the readiness check has decided on is claimed into state and queued, or
quarantined straight from the inbox with the reason. Nothing a user drops gets further unchecked."""
from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

from nstd import logs
from nstd.daemon.inbox import Pending, Readiness
from nstd.daemon.jobfile import check_job, job_name
from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import RETRY_SECONDS, JobQueue, retry_at
from nstd.daemon.store import Store
from nstd.errors import ErrorKind, JobError


class Intake:
    def __init__(self, cfg: dict, readiness: Readiness, store: Store, outcomes: Outcomes, jobs: JobQueue):
        self.cfg, self.readiness, self.store, self.outcomes, self.queue = cfg, readiness, store, outcomes, jobs

    def take(self, p: Pending, error: JobError | None) -> None:
        """A sidecar that is ready (error None) or judged: claim it, or quarantine it."""
        name = job_name(p.sidecar)
        log = logger.bind(job=name, job_id=f"intake:{p.sidecar}")
        with logs.captured(f"intake:{p.sidecar}") as lines:
            try:
                if error is not None:
                    raise error
                assert p.data is not None and p.files is not None
                checked = check_job(p.data, p.files, self.cfg["defaults"], self.cfg["limits"]["max_pixels"])
                for path, (w, h) in checked.sizes.items():
                    log.debug("{}: {}x{}", path.name, w, h)
            except JobError as exc:
                log.error("{}: {}", exc.kind, exc.message)
                self._quarantine(p, name, exc, lines)
                return
            except Exception as exc:  # unexpected: keep the job, keep the daemon
                log.exception("could not take the job: {}", exc)
                self._quarantine(p, name, JobError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"), lines)
                return
            shared = self.readiness.waiting_references(exclude=p.sidecar) & set(checked.files.inputs())
            try:
                job = self.store.claim(name, checked.files, shared, checked.settings, first_seen=wall(p.first_seen),
                                       arrived=p.arrived)
            except OSError as exc:  # rolled back: the files are still in the inbox
                log.error("cannot claim: {}; trying again in {:g} s", exc, RETRY_SECONDS)
                p.hold_until = retry_at()
                return
            self.readiness.forget(p.sidecar)
            log.info("claimed as {} (priority {}){}", job.id, job.priority,
                     f"; kept {len(shared)} shared file(s) in the inbox" if shared else "")
        job.log_path.write_text("".join(lines), encoding="utf-8")
        self.queue.put(job)

    def _quarantine(self, p: Pending, name: str, exc: JobError, lines: list[str]) -> None:
        files = [f for f in p.files.inputs() if f.exists()] if p.files is not None else \
            [p.sidecar, *convention_files(p.sidecar)]
        shared = self.readiness.waiting_references(exclude=p.sidecar) & set(files)
        try:
            self.outcomes.quarantine_inbox(name, files, shared, exc, wall(p.first_seen), "".join(lines))
        except OSError as exc2:  # rolled back: the files are still in the inbox
            logger.bind(job=name).error("could not quarantine: {}; trying again in {:g} s", exc2, RETRY_SECONDS)
            p.hold_until = retry_at()
            return
        self.readiness.forget(p.sidecar)


def wall(monotonic: float) -> float:
    """A time.monotonic() stamp as seconds since the epoch."""
    return time.time() - (time.monotonic() - monotonic)


def convention_files(sidecar: Path) -> list[Path]:
    """`<name>.content.*` and `<name>.style.*` beside a sidecar that could not be read."""
    stem = job_name(sidecar)
    return sorted(p for p in sidecar.parent.glob(f"{stem}.*") if p != sidecar and p.is_file()
                  and p.name.split(".")[-2] in ("content", "style") and p.name.rsplit(".", 2)[0] == stem)
