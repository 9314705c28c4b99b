"""state/status.json: what the daemon is doing, kept current; `nstd status` reads it.

Torch-free, like everything `nstd status` imports: the command answers in a tenth of a second.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from nstd.fsutil import atomic_write_text

STATUS_FILE = "status.json"
#: The intake loop rewrites status.json every second: older than this, the daemon is stalled
#: (stopped with SIGSTOP, or hung).
STALE_SECONDS = 30.0
#: A worker that has not finished a step for this long is stalled (systemd's WatchdogSec).
WORKER_STALL_SECONDS = 300.0


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
            "waiting": [],
            #: counted since started_at (this daemon's start)
            "done": 0,
            "failed": 0,
            #: wall-clock time of the stalest worker's last sign of life
            "worker_heartbeat_at": time.time(),
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


def resumable(state_dir: Path) -> list[str]:
    """Claimed jobs left in state/jobs/ (a stop mid-job, a crash): the next start runs them."""
    out = []
    try:
        folders = sorted(d for d in (state_dir / "jobs").iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return out
    for d in folders:
        try:
            name = json.loads((d / "claim.json").read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(f"{name} (from its checkpoint)" if (d / "checkpoint").is_dir() else name)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def describe(data: dict | None, now: float | None = None, resumable: list[str] | None = None) -> tuple[str, bool]:
    """Human-readable status, and whether a daemon is running. `resumable` names the jobs that
    wait in state/ for the next start (read by the caller when no daemon runs)."""
    now = time.time() if now is None else now
    resume_lines = [f"waiting to resume at the next start: {', '.join(resumable)}"] if resumable else []
    if data is None:
        return "\n".join(["no daemon is running (no status file yet)", *resume_lines]), False
    alive = pid_alive(int(data.get("pid", 0))) and data.get("state") != "stopped"
    updated = data.get("updated_at", 0)
    lines = []
    if not alive:
        lines.append(f"no daemon is running (last status from {_clock(updated)}, pid {data.get('pid')})")
        lines.extend(resume_lines)
        return "\n".join(lines), False
    if now - updated > STALE_SECONDS:
        lines.append(f"nstd is NOT RESPONDING: pid {data.get('pid')} is alive but has not updated its status for "
                     f"{_duration(now - updated)} (stopped with SIGSTOP or kill -STOP? hung?); the rest is as of {_clock(updated)}")
    else:
        lines.append(f"nstd is {data.get('state')} (pid {data.get('pid')}, up {_duration(now - data.get('started_at', now))})")
    run = data.get("running")
    if run:
        eta = run.get("eta_seconds")
        eta_text = f", ETA {_duration(eta)}" if isinstance(eta, (int, float)) else ""
        lines.append(f"running: {run['name']} step {run.get('step', 0)}/{run.get('steps', '?')}{eta_text} on {run.get('device')}")
        beat = data.get("worker_heartbeat_at", now)
        if now - beat > WORKER_STALL_SECONDS:
            lines.append(f"  the worker has not finished a step for {_duration(now - beat)}: stalled?")
    else:
        lines.append("running: nothing")
    queue = data.get("queue") or []
    lines.append(f"queued: {len(queue)}" + (f" ({', '.join(queue[:10])}{', ...' if len(queue) > 10 else ''})" if queue else ""))
    waiting = data.get("waiting") or []
    if isinstance(waiting, int):  # a status.json from before waiting jobs were listed
        waiting = [{"job": "?", "reason": "unknown"}] * waiting
    lines.append(f"waiting in inbox: {len(waiting)}")
    for w in waiting[:20]:
        left = w.get("quarantine_in")
        deadline = f"; quarantined as missing input in {_duration(left)}" if isinstance(left, (int, float)) else ""
        lines.append(f"  {w['job']}: {w['reason']}{deadline}")
    if len(waiting) > 20:
        lines.append(f"  ... and {len(waiting) - 20} more (nstd status --json lists all)")
    lines.append(f"done: {data.get('done', 0)}, failed: {data.get('failed', 0)} "
                 f"(since this daemon started, {_clock(data.get('started_at', 0))})")
    return "\n".join(lines), True
