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

from nstd.daemon.jobfile import SIDECAR_SUFFIXES, JobFiles, inside, read_sidecar, resolve_files
from nstd.errors import ErrorKind, JobError

#: Hidden and temporary names, and the litter operating systems and sync tools leave.
IGNORED_PATTERNS = (
    ".*", "*.tmp", "*.part", "*.crdownload", "~$*", "._*",
    "Thumbs.db", "thumbs.db", "desktop.ini", "Desktop.ini", "@eaDir", "*.swp", "*~",
)


def is_ignored(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in IGNORED_PATTERNS)


def list_sidecars(inbox: Path) -> list[Path]:
    """Sidecars at the top of the inbox (sub-folders may hold images, never jobs)."""
    out = []
    with os.scandir(inbox) as it:
        for entry in it:
            if is_ignored(entry.name) or not entry.name.lower().endswith(SIDECAR_SUFFIXES):
                continue
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                out.append(Path(entry.path))
    return sorted(out)


def signature(paths: list[Path], regular: bool = True) -> tuple | None:
    """(size, mtime) of every path, or None if any is missing (or, with `regular`, not a file)."""
    sig = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            return None
        if regular and not stat.S_ISREG(st.st_mode):
            return None
        sig.append((st.st_size, st.st_mtime_ns))
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
    data: dict | None = None
    error: JobError | None = None
    parsed_sig: tuple | None = None
    #: after a failed claim or quarantine (a full disk, say): not looked at again before this
    hold_until: float = 0.0


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
    pending: dict[Path, Pending] = field(default_factory=dict)

    def update(self, sidecars: list[Path], now: float | None = None) -> None:
        """Track newly seen sidecars and forget those that left the inbox."""
        now = time.monotonic() if now is None else now
        current = set(sidecars)
        for gone in set(self.pending) - current:
            del self.pending[gone]
        for s in sidecars:
            if s not in self.pending:
                try:
                    arrived = s.lstat().st_ctime
                except OSError:
                    arrived = time.time()
                self.pending[s] = Pending(s, now, arrived)

    def configure(self, settle_seconds: float, missing_timeout: float, max_sidecar_bytes: int) -> None:
        """New timings and limits (SIGHUP); jobs already waiting keep their first-seen time."""
        self.settle_seconds, self.missing_timeout, self.max_sidecar_bytes = settle_seconds, missing_timeout, max_sidecar_bytes

    def forget(self, sidecar: Path) -> None:
        self.pending.pop(sidecar, None)

    def check(self, now: float | None = None) -> list[Verdict]:
        """Verdicts for sidecars that are ready or must be quarantined; others keep waiting."""
        now = time.monotonic() if now is None else now
        out = []
        for p in list(self.pending.values()):
            v = self._check_one(p, now)
            if v is not None:
                out.append(v)
        return out

    def _parse(self, p: Pending) -> None:
        sig = signature([p.sidecar])
        if sig is not None and sig == p.parsed_sig:
            return
        p.parsed_sig = sig
        p.error, p.files, p.data = None, None, None
        try:
            if not inside(Path(os.path.realpath(p.sidecar)), Path(os.path.realpath(self.inbox))):
                raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{p.sidecar.name} is a link that leads out of the inbox")
            p.data = read_sidecar(p.sidecar, self.max_sidecar_bytes)
            p.files = resolve_files(p.data, p.sidecar, self.inbox)
        except JobError as exc:
            p.error = exc
        except OSError as exc:
            p.error = JobError(ErrorKind.UNREADABLE, f"{p.sidecar.name}: {exc.strerror or exc}")

    def _check_one(self, p: Pending, now: float) -> Verdict | None:
        if not p.sidecar.exists() and not p.sidecar.is_symlink():
            self.pending.pop(p.sidecar, None)
            return None
        if now < p.hold_until:
            return None
        self._parse(p)
        watched = [p.sidecar] if p.files is None else p.files.inputs()
        # One stat a file a tick; only a gap costs a second look. A job file judged for an error
        # (it may be a link to a FIFO outside) only has to settle, never be a regular file.
        sig = signature(watched, regular=p.files is not None)
        if p.files is not None:
            p.files.missing = [] if sig is not None else [f for f in watched if not f.is_file()]
        if sig != p.sig or sig is None:
            p.sig, p.stable_since = sig, now
        settled = sig is not None and now - p.stable_since >= self.settle_seconds
        if p.error is not None:
            # A broken sidecar may be half-written: judge it once it has settled.
            return Verdict(p, error=p.error) if settled else None
        assert p.files is not None
        if p.files.missing:
            if now - p.first_seen >= self.missing_timeout:
                names = ", ".join(f.name for f in p.files.missing if f != p.sidecar)
                return Verdict(p, error=JobError(ErrorKind.MISSING_INPUT, f"still missing after {self.missing_timeout:g} s: {names}"))
            return None
        return Verdict(p, ready=True) if settled else None

    def waiting_references(self, exclude: Path) -> set[Path]:
        """Every input named by another waiting sidecar: those files must stay in the inbox."""
        refs: set[Path] = set()
        for s, p in self.pending.items():
            if s != exclude and p.files is not None:
                refs.update(f for f in p.files.inputs() if f != s)
        return refs


