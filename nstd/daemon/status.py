"""state/status.json: what the daemon is doing, kept current; `nstd status` reads it."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from nstd.daemon.queue import RETRY_SECONDS
from nstd.fsutil import atomic_write_text

STATUS_FILE = "status.json"


class Status:
    """Thread-safe daemon status, written atomically at most every `interval` seconds."""

    def __init__(self, state_dir: Path, interval: float = 1.0):
        self.path = state_dir / STATUS_FILE
        self.interval = interval
        self._lock = threading.Lock()
        self._last_write = 0.0
        self.data: dict = {
            "pid": os.getpid(),
            "started_at": time.time(),
            "state": "starting",
            "running": None,
            "queue": [],
            "waiting": 0,
            "done": 0,
            "failed": 0,
        }

    def update(self, force: bool = False, **fields) -> None:
        with self._lock:
            self.data.update(fields)
            now = time.monotonic()
            if not force and now - self._last_write < self.interval:
                return
            self._last_write = now
            self.data["updated_at"] = time.time()
            text = json.dumps(self.data, indent=1)
        try:
            atomic_write_text(self.path, text)
        except OSError:
            pass  # status is informative; a full disk must not stop the work

    def count(self, key: str) -> None:
        with self._lock:
            self.data[key] += 1
        self.update(force=True)


def iso(t: float) -> str:
    """Local time with offset, for error.yaml and reports."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def read_status(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(data: dict | None) -> tuple[str, bool]:
    """Human-readable status, and whether a daemon is running."""
    if data is None:
        return "no daemon is running (no status file yet)", False
    alive = pid_alive(int(data.get("pid", 0))) and data.get("state") != "stopped"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.get("updated_at", 0)))
    lines = []
    if not alive:
        lines.append(f"no daemon is running (last status from {when}, pid {data.get('pid')})")
    else:
        lines.append(f"nstd is {data.get('state')} (pid {data.get('pid')}, updated {when})")
    run = data.get("running")
    if run:
        eta = run.get("eta_seconds")
        eta_text = f", ETA {eta:.0f} s" if isinstance(eta, (int, float)) else ""
        lines.append(f"running: {run['name']} step {run.get('step', 0)}/{run.get('steps', '?')}{eta_text} on {run.get('device')}")
    else:
        lines.append("running: nothing")
    queue = data.get("queue") or []
    lines.append(f"queued: {len(queue)}" + (f" ({', '.join(queue[:10])}{', ...' if len(queue) > 10 else ''})" if queue else ""))
    lines.append(f"waiting in inbox: {data.get('waiting', 0)}")
    for held in data.get("held") or []:
        lines.append(f"  held: {held['job']}: {held['reason']} (tried again every {RETRY_SECONDS:g} s)")
    lines.append(f"done: {data.get('done', 0)}, failed: {data.get('failed', 0)}")
    return "\n".join(lines), alive
