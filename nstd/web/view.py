"""What the page shows, gathered from the daemon's status, the live job and the folders.

Listings of the outbox and the quarantine are cached for a few seconds, so a flood of requests
costs a few directory reads, not one per request. Paths are shown relative to the root."""
from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nstd import yamltext
from nstd.state.live import PREVIEW_FILE
from nstd.state.names import RETRIED
from nstd.state.status import cluster_counts, workers

#: How long a listing of the outbox or the quarantine is reused.
LISTING_SECONDS = 3.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: error.yaml is read up to this many bytes (the quarantine may be writable by others).
MAX_ERROR_BYTES = 8192


@dataclass
class Entry:
    """A folder in the outbox or the quarantine, as the page lists it."""

    name: str
    area: str  # "outbox" | "quarantine"
    at: float
    result: str | None = None  # file name inside the folder
    gif: str | None = None
    reason: str = ""
    #: a cancel, not a failure: shown muted
    cancelled: bool = False


class View:
    """`status` reads the daemon's status.json (with its `live` part); the preview is the file
    the worker publishes in `state`."""

    def __init__(self, status: Callable[[], dict], state: Path, root: Path, outbox: Path, quarantine: Path,
                 results: int):
        self.status = status
        self.state = state
        self.preview = state / PREVIEW_FILE
        self.root, self.outbox, self.quarantine, self.results = root, outbox, quarantine, results
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[Entry]]] = {}
        #: error.yaml's reason by (device, inode, mtime, size): each file is parsed once
        self._reasons: dict[tuple, str] = {}

    def areas(self) -> dict[str, Path]:
        return {"outbox": self.outbox, "quarantine": self.quarantine}

    def _folder_of(self, listing: str) -> Path:
        """'retried' lists the quarantine's NAME.retried-<time> folders, apart from the failures."""
        return self.quarantine if listing == "retried" else self.areas()[listing]

    def recent(self, area: str) -> list[Entry]:
        """The newest folders of an area; one thread lists while the others wait and reuse it, and
        a listing is stamped when it is done (a slow one is still reused)."""
        with self._lock:
            hit = self._cache.get(area)
            if hit and time.monotonic() - hit[0] < LISTING_SECONDS:
                return hit[1]
            entries = self._list(area)
            self._cache[area] = (time.monotonic(), entries)
            return entries

    def _list(self, listing: str) -> list[Entry]:
        """The newest folders of the outbox, of the quarantine (its retried ones left out: they
        must not push failures off the page) or of the retried ones alone."""
        folder, area = self._folder_of(listing), "outbox" if listing == "outbox" else "quarantine"
        found = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                        continue
                    if area == "quarantine" and ((RETRIED in e.name) != (listing == "retried")):
                        continue
                    try:
                        found.append((e.stat(follow_symlinks=False).st_mtime, e.name))
                    except OSError:
                        continue
        except OSError:
            return []
        found.sort(reverse=True)
        return [self._entry(area, folder / name, name, at) for at, name in found[: self.results]]

    def _entry(self, area: str, folder: Path, name: str, at: float) -> Entry:
        entry = Entry(name, area, at)
        try:
            with os.scandir(folder) as it:
                files = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
        except OSError:
            files = []
        if area == "outbox":
            entry.result = next((f for f in files if f.lower().endswith(IMAGE_SUFFIXES)), None)
            entry.gif = next((f for f in files if f.lower().endswith(".gif")), None)
        elif RETRIED in name:
            entry.reason = "retried (nstd retry); kept for its error.yaml and job.log"
        else:
            entry.reason = self._reason(folder)
            entry.cancelled = entry.reason.startswith("cancelled:")
        return entry

    def _reason(self, folder: Path) -> str:
        """'kind: message' from error.yaml, read as a stranger's file (the quarantine may be
        writable by others): no link, a regular file with one name, capped, parsed once."""
        try:
            fd = os.open(folder / "error.yaml", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return "no error.yaml"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return "error.yaml is not nstd's"
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key not in self._reasons:
                if len(self._reasons) > 10_000:
                    self._reasons.clear()
                self._reasons[key] = _reason_in(os.read(fd, MAX_ERROR_BYTES))
            return self._reasons[key]
        finally:
            os.close(fd)

    def data(self) -> dict:
        """/status.json: the daemon's status.json, plus the live job, the last results and the
        quarantine; the same data the page shows."""
        status = self.status()
        live = status.get("live") if isinstance(status.get("live"), dict) else {}
        now = time.time()
        records = workers(self.state, now) if status.get("backend") == "celery" else []
        cluster = [{"name": w["name"], "host": w.get("host"), "device": w.get("device"), "running": w["running"],
                    "state": w.get("state"), "heard_from": now - w["updated_at"]} for w in records]
        counts = {}
        if status.get("backend") == "celery":  # the workers deliver: their counts join the intake's
            counts = cluster_counts(status, records)
        return printable({
            **status,
            **counts,
            "workers": cluster,
            "live": {**live, "losses": _points(live.get("losses"))},
            "results": [_entry_json(e) for e in self.recent("outbox")],
            "quarantine": [_entry_json(e) for e in self.recent("quarantine")],
            "retried": [_entry_json(e) for e in self.recent("retried")],
        })


def _points(losses) -> list[list[float]]:
    """The loss plot's points as status.json holds them, only the well-formed ones."""
    if not isinstance(losses, list):
        return []
    return [[p[0], p[1]] for p in losses if isinstance(p, list) and len(p) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)]


def _entry_json(e: Entry) -> dict:
    return {"name": e.name, "at": e.at, "result": e.result, "gif": e.gif, "reason": e.reason, "cancelled": e.cancelled}


def _reason_in(raw: bytes) -> str:
    try:
        data = yamltext.load(raw.decode("utf-8", "replace"))
    except yamltext.YAMLError:
        return "error.yaml cannot be read"
    if not isinstance(data, dict):
        return "error.yaml cannot be read"
    return f"{data.get('kind', '?')}: {data.get('message', '')}"[:500]


def printable(value):
    """Every string in `value` (nested) as text a page can carry: a name that is not valid UTF-8
    (a lone surrogate from the file system or JSON) shows '?' for its bad bytes, never a 500."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(value) else value
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable(v) for v in value]
    return value


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
