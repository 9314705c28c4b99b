"""Intake: a job file the readiness check has decided on is claimed into state and queued, or
quarantined straight from the inbox with the reason. Nothing a user drops gets further unchecked."""
from __future__ import annotations

import os
import time
from pathlib import Path

from loguru import logger

from nstd import logs
from nstd.daemon.inbox import Pending, Readiness
from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import RETRY_SECONDS, JobQueue
from nstd.errors import ErrorKind, JobError
from nstd.job.check import check_job
from nstd.job.file import NO_LINKS, job_name, named_files
from nstd.state import safefs
from nstd.state.claim import Claim
from nstd.state.store import LEFT_WHY, Store


class Intake:
    def __init__(self, cfg: dict, readiness: Readiness, store: Store, outcomes: Outcomes, jobs: JobQueue):
        self.cfg, self.readiness, self.store, self.outcomes, self.queue = cfg, readiness, store, outcomes, jobs

    def take(self, p: Pending, error: JobError | None) -> None:
        """A sidecar that is ready (error None) or judged: claim it, or quarantine it."""
        name = job_name(p.sidecar)
        p.held_for = ""
        log = logger.bind(job=name, job_id=f"intake:{p.sidecar}")
        with logs.captured(f"intake:{p.sidecar}") as lines:
            try:
                if error is not None:
                    raise error
                assert p.job is not None and p.files is not None
                with self.store.pinned(p.files.inputs()) as pins:  # what is checked is what is claimed
                    limits = self.cfg["limits"]
                    checked = check_job(p.job, limits, pins)
                    for path, (w, h) in checked.sizes.items():
                        log.debug("{}: {}x{}", path.name, w, h)
                    shared = self.readiness.waiting_references(exclude=p.sidecar) & set(checked.files.inputs())
                    job = self._claim(p, name, checked, shared, pins, log)
            except FileNotFoundError:
                return  # a file went away since the readiness check: the job waits again
            except (JobError, safefs.Refused, OSError, UnicodeEncodeError) as exc:
                exc = as_job_error(exc)
                log.error("{}: {}", exc.kind, exc.message)
                self._quarantine(p, name, exc, lines)
                return
            except Exception as exc:  # unexpected: keep the job, keep the daemon
                log.exception("could not take the job: {}", exc)
                self._quarantine(p, name, JobError(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"), lines)
                return
            if job is None:
                return
            self.readiness.forget(p.sidecar)
            log.info("claimed as {} (priority {}){}", job.id, job.priority,
                     f"; kept {len(shared)} shared file(s) in the inbox" if shared else "")
        job.log_path.write_text("".join(lines), encoding="utf-8", errors="backslashreplace")
        self.queue.put(job)

    def _claim(self, p: Pending, name: str, checked, shared: set[Path], pins, log) -> Claim | None:
        """Claim the pinned files; None (and held for a retry) when the store cannot be written."""
        left: list[str] = []
        try:
            job = self.store.claim(name, checked.files, shared, checked.settings, pins,
                                   first_seen=wall(p.first_seen), arrived=p.arrived, left=left)
            for rel in left:
                log.warning("{}: {}; the job took a copy and the file stays in the inbox", rel, LEFT_WHY)
            return job
        except safefs.Refused:
            raise
        except OSError as exc:  # rolled back: the files are still in the inbox
            log.error("cannot claim: {}; trying again in {:g} s", exc, RETRY_SECONDS)
            p.hold(f"cannot claim: {exc}")
            return None

    def _quarantine(self, p: Pending, name: str, exc: JobError, lines: list[str]) -> None:
        if p.files is not None:
            files = p.files.inputs()
        else:  # refused before its files were resolved: whichever it names that can be reached go with it
            files = [*named_files(p.sidecar, self.store.inbox, self.cfg["limits"]["max_sidecar_bytes"]), p.sidecar,
                     *convention_files(p.sidecar)]
        shared = self.readiness.waiting_references(exclude=p.sidecar) & set(files)
        judged = _lstat(p.sidecar)
        try:
            self.outcomes.quarantine_inbox(name, p.sidecar, files, shared, exc, wall(p.first_seen), "".join(lines))
        except OSError as exc2:  # rolled back: the files are still in the inbox
            logger.bind(job=name).error("could not quarantine: {}; trying again in {:g} s", exc2, RETRY_SECONDS)
            p.hold(f"could not quarantine ({exc.kind}: {exc.message}): {exc2}")
            return
        now = _lstat(p.sidecar)
        if judged is not None and now is not None and (now.st_dev, now.st_ino) == (judged.st_dev, judged.st_ino):
            self.readiness.refuse(p.sidecar, judged)  # left where it was: no way to move it aside
        else:
            self.readiness.forget(p.sidecar)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except (OSError, ValueError):
        return None


def as_job_error(exc: Exception) -> JobError:
    """What pinning or reading a user's file raised, as the job's error."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, safefs.Refused):
        kind = ErrorKind.PATH_OUTSIDE_INBOX if exc.outside else ErrorKind.INVALID_JOB_FILE
        return JobError(kind, f"{exc.rel!r} {exc.reason}" + (f"; {NO_LINKS}" if exc.outside else ""))
    if isinstance(exc, UnicodeEncodeError):
        return JobError(ErrorKind.INVALID_JOB_FILE, "a file name is not valid text")
    return JobError(ErrorKind.UNREADABLE, f"{getattr(exc, 'filename', '') or 'a file'}: {exc.strerror or exc} "
                    "(the service user must be able to read every file of the job)")


def wall(monotonic: float) -> float:
    """A time.monotonic() stamp as seconds since the epoch."""
    return time.time() - (time.monotonic() - monotonic)


def convention_files(sidecar: Path) -> list[Path]:
    """`<name>.content.*` and `<name>.style.*` beside a sidecar that could not be read."""
    stem = job_name(sidecar)
    return sorted(p for p in sidecar.parent.glob(f"{stem}.*") if p != sidecar and p.is_file()
                  and p.name.split(".")[-2] in ("content", "style") and p.name.rsplit(".", 2)[0] == stem)
