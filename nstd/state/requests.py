"""Cancel requests: `state/cancel/<job id>` (or `inbox-<digest>` for a job still in the inbox),
left by `nstd cancel`, read by the daemon's intake (or a job's worker) within a tick."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from nstd.errors import ErrorKind, JobError, Stage
from nstd.fsutil import atomic_write_text

REQUESTS = "cancel"


def ask(state: Path, job_id: str) -> None:
    atomic_write_text(state / REQUESTS / job_id, f"{time.time()}\n")


#: A request for a job still in the inbox: `inbox-<digest of its job file's name>`, the name inside.
INBOX_PREFIX = "inbox-"


def ask_inbox(state: Path, sidecar: str) -> str:
    """Ask the intake to quarantine the job file `sidecar` (a name in the inbox) as cancelled
    before it is taken; the request's name."""
    key = INBOX_PREFIX + hashlib.sha256(sidecar.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    atomic_write_text(state / REQUESTS / key, sidecar + "\n")
    return key


def inbox_request(state: Path, key: str) -> str | None:
    """The job file's name an inbox request names (None: unreadable, or not one)."""
    try:
        return (state / REQUESTS / key).read_bytes()[:4096].decode("utf-8", "surrogateescape").strip() or None
    except OSError:
        return None


def requests(state: Path) -> list[str]:
    """Job ids asked to be cancelled; an absent folder means none (one listdir a tick)."""
    try:
        return sorted(n for n in os.listdir(state / REQUESTS) if not n.startswith("."))
    except OSError:
        return []


def answered(state: Path, job_id: str) -> bool:
    """Drop a request once acted on; False when it cannot be (written by another user, say)."""
    try:
        os.unlink(state / REQUESTS / job_id)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def cancelled_error(stage: Stage, detail: str = "") -> JobError:
    return JobError(ErrorKind.CANCELLED, "cancelled with nstd cancel" + detail, stage)
