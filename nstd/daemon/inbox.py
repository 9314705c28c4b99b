"""What in the inbox is a job, and when a job is ready to take.

A sidecar is ready when it and every file it names exist and have kept the same size and mtime
for `settle_seconds`. A sidecar that cannot be read is given the same time to settle (it may still
be being written) before it is judged. Inputs that never arrive are "missing input" after
`missing_timeout`.
"""
from __future__ import annotations

import fnmatch
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from nstd.daemon import inboxnote
from nstd.daemon.queue import retry_at
from nstd.errors import ErrorKind, JobError
from nstd.job.file import SIDECAR_SUFFIXES, ParsedJob, check_input, job_name, parse_job, waiting_for
from nstd.job.keys import JOB_FIELDS
from nstd.schema import defaults
from nstd.state import safefs
from nstd.state.claim import JobFiles

#: Hidden and temporary names, and the litter operating systems and sync tools leave.
IGNORED_PATTERNS = (
    ".*", "*.tmp", "*.part", "*.crdownload", "~$*", "._*",
    "Thumbs.db", "thumbs.db", "desktop.ini", "Desktop.ini", "@eaDir", "*.swp", "*~",
)


def is_ignored(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in IGNORED_PATTERNS)


def list_sidecars(inbox: Path) -> list[Path]:
    """Job files at the top of the inbox (sub-folders may hold images, never jobs). Anything named
    like one that is not a folder counts, links and FIFOs too: they are judged, never opened."""
    out = []
    with os.scandir(inbox) as it:
        for entry in it:
            if is_ignored(entry.name) or not entry.name.lower().endswith(SIDECAR_SUFFIXES):
                continue
            if not entry.is_dir(follow_symlinks=False):
                out.append(Path(entry.path))
    return sorted(out)


def signature(inbox_fd: int, inbox: Path, paths: list[Path], regular: bool = True) -> tuple | None:
    """(size, mtime, inode) of every path, links not followed, or None if any is missing. With `regular`,
    anything but a regular file raises JobError: the job is judged at once."""
    sig = []
    for p in paths:
        rel = safefs.relative(inbox, p)
        try:
            st = safefs.lstat(inbox_fd, rel)
        except FileNotFoundError:
            return None
        except (safefs.Refused, OSError, UnicodeEncodeError):
            if not regular:
                return None
            st = None
        if regular and (st is None or not stat.S_ISREG(st.st_mode)):
            check_input(inbox_fd, rel, p.name)  # raises the job's error
            return None  # gone in between
        sig.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


@dataclass
class Pending:
    """A sidecar seen in the inbox and not yet taken or judged."""

    sidecar: Path
    first_seen: float
    #: when the job file arrived (its ctime: set by creating or renaming it into the inbox, and not
    #: carried over by `cp -p` the way mtime is); "oldest first" means this
    arrived: float = 0.0
    sig: tuple | None = None
    stable_since: float = 0.0
    files: JobFiles | None = None
    #: the job file read and its keys checked (None until it parses)
    job: ParsedJob | None = None
    error: JobError | None = None
    parsed_sig: tuple | None = None
    #: when the job file itself last changed (monotonic): a job file being rewritten may read as
    #: empty, naming inputs by convention that are not there, until it settles
    sidecar_changed: float = 0.0
    #: after a failed claim or quarantine (a full disk, say): not looked at again before this
    hold_until: float = 0.0
    #: why it is held, for `nstd status` and the log
    held_for: str = ""
    #: "waiting for <file>" was logged (once a job)
    told_waiting: bool = False

    def hold(self, reason: str) -> None:
        """Try this job again after the retry delay; `nstd status` shows why it waits."""
        self.hold_until, self.held_for = retry_at(), reason


@dataclass
class Verdict:
    """What the readiness check decided about one sidecar."""

    pending: Pending
    ready: bool = False
    error: JobError | None = None


@dataclass
class Readiness:
    settle_seconds: float
    missing_timeout: float
    max_sidecar_bytes: int
    inbox: Path
    #: config.yaml's job defaults, against which a job file's keys are checked (None: built in)
    defaults: dict | None = None
    pending: dict[Path, Pending] = field(default_factory=dict)
    #: job files judged and quarantined that could not be moved or renamed aside: (dev, ino,
    #: ctime) of each, so the same file is not judged again and again (a new one is)
    refused: set[tuple[int, int, int]] = field(default_factory=set)
    #: job files with a NAME.waiting.txt beside them
    notes: set[Path] = field(default_factory=set)
    #: the inbox was looked at for notes an earlier run left
    swept: bool = False

    def update(self, sidecars: list[Path], now: float | None = None) -> None:
        """Track newly seen sidecars and forget those that left the inbox."""
        now = time.monotonic() if now is None else now
        current = set(sidecars)
        for gone in set(self.pending) - current:
            del self.pending[gone]
        for s in sidecars:
            if s not in self.pending:
                try:
                    st = s.lstat()
                except OSError:
                    continue
                if (st.st_dev, st.st_ino, st.st_ctime_ns) in self.refused:
                    continue
                self.pending[s] = Pending(s, now, st.st_ctime)

    def __post_init__(self) -> None:
        if self.defaults is None:

            self.defaults = defaults(JOB_FIELDS)

    def configure(self, settle_seconds: float, missing_timeout: float, max_sidecar_bytes: int, job_defaults: dict) -> None:
        """New timings, limits and job defaults (SIGHUP); jobs already waiting keep their first-seen
        time, and their job files are read again."""
        self.settle_seconds, self.missing_timeout, self.max_sidecar_bytes = settle_seconds, missing_timeout, max_sidecar_bytes
        self.defaults = job_defaults
        for p in self.pending.values():
            p.parsed_sig = None

    def refuse(self, sidecar: Path, judged: os.stat_result) -> None:
        """A judged job file still in the inbox (it could not be moved aside): that very file,
        `judged`, is not judged again; anything else put under its name is."""
        self.refused.add((judged.st_dev, judged.st_ino, judged.st_ctime_ns))
        self.forget(sidecar)

    def forget(self, sidecar: Path) -> None:
        """The job was taken or judged: its note (if any) goes with it, now."""
        self.pending.pop(sidecar, None)
        if sidecar in self.notes:
            self.notes.discard(sidecar)
            try:
                inbox_fd = safefs.open_inbox(self.inbox)
            except OSError:
                return
            try:
                inboxnote.remove(inbox_fd, sidecar.name)
            finally:
                os.close(inbox_fd)

    def check(self, now: float | None = None) -> list[Verdict]:
        """Verdicts for sidecars that are ready or must be quarantined; others keep waiting."""
        now = time.monotonic() if now is None else now
        out = []
        if not self.pending and not self.notes and self.swept:
            return out
        try:
            inbox_fd = safefs.open_inbox(self.inbox)
        except OSError:
            return out  # the intake loop reports an unreadable inbox
        try:
            self._take_notes_back(inbox_fd)
            for p in list(self.pending.values()):
                try:
                    v = self._check_one(inbox_fd, p, now)
                except JobError as exc:
                    v = Verdict(p, error=exc)
                except Exception as exc:  # nothing a user drops may stop the intake
                    v = Verdict(p, error=JobError(ErrorKind.INVALID_JOB_FILE, f"{p.sidecar.name!r}: {type(exc).__name__}: {exc}"))
                if v is not None:
                    out.append(v)
        finally:
            os.close(inbox_fd)
        return out

    def _note(self, inbox_fd: int, p: Pending, left: float) -> None:
        """NAME.waiting.txt beside a job file that waits for an input (nstd/daemon/inboxnote.py)."""
        assert p.files is not None
        until = time.strftime("%H:%M", time.localtime(time.time() + left))
        text = (f"{p.sidecar.name} waits for {waiting_for(p.files)}: not in the inbox yet.\n"
                f"Put it there within {left / 60:.0f} min (by {until}), or the job goes to the quarantine as "
                f"missing input.\nThis note goes away when the job is taken or leaves the inbox.\n")
        try:
            if inboxnote.write(inbox_fd, p.sidecar.name, text):
                self.notes.add(p.sidecar)
        except OSError as exc:  # a full or read-only inbox: the log and nstd status still say it
            logger.debug("no note beside {}: {}", p.sidecar.name, exc)

    def _take_notes_back(self, inbox_fd: int) -> None:
        """The notes of jobs that no longer wait for an input (taken, judged, gone) go; at the
        first look, also those an earlier run left beside job files that are there no more."""
        if not self.swept:
            self.swept = True
            try:
                names = os.listdir(inbox_fd)
            except OSError:
                names = []
            for n in names:
                if n.endswith(inboxnote.SUFFIX):
                    self.notes.add(self.inbox / (n[: -len(inboxnote.SUFFIX)] + ".yaml"))
        for sidecar in list(self.notes):
            p = self.pending.get(sidecar)
            if p is None or p.files is None or not p.files.missing:
                inboxnote.remove(inbox_fd, sidecar.name)
                self.notes.discard(sidecar)

    def _parse(self, inbox_fd: int, p: Pending, now: float) -> None:
        sig = signature(inbox_fd, self.inbox, [p.sidecar], regular=False)
        if sig is not None and sig == p.parsed_sig:
            return
        # Seen changing: now; read for the first time: as old as it was first seen.
        p.sidecar_changed = now if p.parsed_sig is not None else p.first_seen
        p.parsed_sig = sig
        p.error, p.files, p.job = None, None, None
        try:
            assert self.defaults is not None
            p.job = parse_job(p.sidecar, self.inbox, self.defaults, self.max_sidecar_bytes)
            p.files = p.job.files
        except JobError as exc:
            p.error = exc
        except Exception as exc:  # a job file that breaks the parser is that job's problem only
            p.error = JobError(ErrorKind.INVALID_JOB_FILE, f"{p.sidecar.name!r}: cannot be read ({type(exc).__name__}: {exc})")

    def _check_one(self, inbox_fd: int, p: Pending, now: float) -> Verdict | None:
        try:
            present = os.path.lexists(p.sidecar)
        except (UnicodeEncodeError, ValueError):
            present = True
        if not present:
            self.pending.pop(p.sidecar, None)
            return None
        if now < p.hold_until:
            return None
        self._parse(inbox_fd, p, now)
        watched = [p.sidecar] if p.files is None else p.files.inputs()
        # One lstat a file a tick; only a gap costs a second look. A job file judged for an error
        # (it may be a link to a FIFO outside) only has to settle, never be a regular file.
        sig = signature(inbox_fd, self.inbox, watched, regular=p.files is not None)
        if p.files is not None:
            p.files.missing = [] if sig is not None else \
                [f for f in watched if signature(inbox_fd, self.inbox, [f], regular=False) is None]
        if sig != p.sig or sig is None:
            p.sig, p.stable_since = sig, now
        settled = sig is not None and now - p.stable_since >= self.settle_seconds
        if p.error is not None:
            # A broken sidecar may be half-written: judge it once it has settled.
            return Verdict(p, error=p.error) if settled else None
        assert p.files is not None
        if p.files.missing:
            waited = now - p.first_seen
            if now - p.sidecar_changed < self.settle_seconds:
                return None  # the job file itself is still being written: what it names may change
            if waited >= self.missing_timeout:
                return Verdict(p, error=JobError(ErrorKind.MISSING_INPUT, f"still missing after {self.missing_timeout:g} s: {waiting_for(p.files)}"))
            if waited >= self.settle_seconds and not p.told_waiting:
                p.told_waiting = True
                left = self.missing_timeout - waited
                logger.bind(job=job_name(p.sidecar)).info(
                    "{}: waiting for {} (quarantined as missing input in {:.0f} s)", p.sidecar.name,
                    waiting_for(p.files), left)
                self._note(inbox_fd, p, left)
            return None
        return Verdict(p, ready=True) if settled else None

    def waiting(self, now: float | None = None) -> list[dict]:
        """Every job file in the inbox not yet taken, oldest first, with why it waits: for
        `nstd status` and the status page. `quarantine_in` (seconds) is set for a job waiting
        for an input that may never come."""
        now = time.monotonic() if now is None else now
        out = []
        for p in sorted(self.pending.values(), key=lambda p: p.first_seen):
            entry: dict = {"job": p.sidecar.name, "since": now - p.first_seen}
            if p.held_for:
                entry["reason"] = f"held: {p.held_for} (tried again in {max(0.0, p.hold_until - now):.0f} s)"
            elif p.files is not None and p.files.missing:
                entry["reason"] = f"waiting for {waiting_for(p.files) or p.sidecar.name}"
                entry["quarantine_in"] = max(0.0, self.missing_timeout - (now - p.first_seen))
            elif p.error is not None:
                entry["reason"] = f"{p.error.kind}: judged once the file stops changing"
            else:
                entry["reason"] = "settling: taken once its files stop changing"
            out.append(entry)
        return out

    def settled(self, now: float | None = None) -> bool:
        """Nothing left to take now (--until-empty): every job file waits for an input or a retry,
        or has kept changing for longer than missing_timeout (it is logged, and left)."""
        now = time.monotonic() if now is None else now
        for p in self.pending.values():
            if p.held_for or (p.files is not None and p.files.missing
                              and now - p.sidecar_changed >= self.settle_seconds):
                continue
            if now - p.first_seen < self.missing_timeout:
                return False
            if not p.told_waiting:
                p.told_waiting = True
                logger.bind(job=job_name(p.sidecar)).warning(
                    "{}: its files are still changing after {:g} s; left in the inbox", p.sidecar.name, self.missing_timeout)
        return True

    def waiting_references(self, exclude: Path) -> set[Path]:
        """Every input named by another waiting sidecar: those files must stay in the inbox."""
        refs: set[Path] = set()
        for s, p in self.pending.items():
            if s != exclude and p.files is not None:
                refs.update(f for f in p.files.inputs() if f != s)
        return refs


