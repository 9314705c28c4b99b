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
from nstd.state.claim import claimed

STATUS_FILE = "status.json"
#: The intake loop rewrites status.json every second: older than this, the daemon is stalled
#: (stopped with SIGSTOP, or hung).
STALE_SECONDS = 30.0
#: A worker that has not finished a step for this long is stalled (systemd's WatchdogSec).
WORKER_STALL_SECONDS = 300.0


class Status:
    """Thread-safe daemon status, written atomically at most every `interval` seconds."""

    def __init__(self, state_dir: Path, interval: float = 1.0, path: Path | None = None):
        """`path`: another file than state/status.json (an `nstd worker`'s record)."""
        self.path = path or state_dir / STATUS_FILE
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
            #: quarantined for the job's own reason, and by kind (`bad image`: 2); cancels apart
            "failed": 0,
            "failed_kinds": {},
            "cancelled": 0,
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

    def snapshot(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self.data))  # a deep copy, as status.json would read

    def count(self, key: str) -> None:
        with self._lock:
            self.data[key] += 1
        self.update(force=True)

    def count_quarantined(self, kind: str) -> None:
        """A job quarantined: a cancel is counted as one, anything else as failed under its kind."""
        with self._lock:
            if kind == "cancelled":
                self.data["cancelled"] += 1
            else:
                self.data["failed"] += 1
                kinds = self.data["failed_kinds"]
                kinds[kind] = kinds.get(kind, 0) + 1
        self.update(force=True)


def read_status(state_dir: Path, name: str = STATUS_FILE) -> dict | None:
    """status.json with every field of the type `describe` expects (a damaged file, or one from
    another version, gives defaults rather than a traceback); None when there is none."""
    try:
        data = json.loads((state_dir / name).read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return clean(data) if isinstance(data, dict) else None


def clean(data: dict) -> dict:
    def num(v, default=0.0):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e18 else default

    def text(v, default="?"):
        return v if isinstance(v, str) else default

    run = data.get("running")
    if isinstance(run, dict):
        run = {"name": text(run.get("name")), "step": int(num(run.get("step"))), "steps": text(run.get("steps"), None)
               or int(num(run.get("steps"))), "eta_seconds": num(run.get("eta_seconds"), None),
               "device": text(run.get("device"))}
    else:
        run = None
    waiting = data.get("waiting")
    if isinstance(waiting, int) and not isinstance(waiting, bool):  # a status.json from before the list
        waiting = [{"job": "?", "reason": "unknown"}] * min(waiting, 10_000)
    waiting = [{"job": text(w.get("job")), "reason": text(w.get("reason"), "unknown"),
                "quarantine_in": num(w.get("quarantine_in"), None)}
               for w in (waiting if isinstance(waiting, list) else []) if isinstance(w, dict)]
    queue = data.get("queue")
    held = data.get("held")
    pid = data.get("pid")
    return {**data, "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**22 else 0,
            "state": text(data.get("state")), "started_at": num(data.get("started_at")),
            "updated_at": num(data.get("updated_at")), "worker_heartbeat_at": num(data.get("worker_heartbeat_at"), None),
            "running": run, "queue": [text(q) for q in queue] if isinstance(queue, list) else [],
            "waiting": waiting, "done": int(num(data.get("done"))), "failed": int(num(data.get("failed"))),
            "cancelled": int(num(data.get("cancelled"))), "failed_kinds": _kinds(data.get("failed_kinds")),
            "held": {text(k): text(v) for k, v in list(held.items())[:1000]} if isinstance(held, dict) else {},
            "expired": _expired(data.get("expired"))}


def _expired(value) -> dict | None:
    """What outbox.keep_days removed (nstd/daemon/expiry.py), only what is well formed."""
    if not isinstance(value, dict) or not isinstance(value.get("count"), int):
        return None
    names = value.get("names")
    return {"count": value["count"], "at": value.get("at") if isinstance(value.get("at"), (int, float)) else 0,
            "days": value.get("days") if isinstance(value.get("days"), (int, float)) else 0,
            "names": [n for n in names if isinstance(n, str)][:10] if isinstance(names, list) else []}


def _kinds(value) -> dict[str, int]:
    """status.json's failed_kinds, only what is well formed (the page reads it as a stranger's)."""
    if not isinstance(value, dict):
        return {}
    return {str(k)[:64]: int(v) for k, v in list(value.items())[:64]
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def resumable(state_dir: Path) -> list[str]:
    """Claimed jobs left in state/jobs/ (a stop mid-job, a crash): the next start runs them."""
    return [f"{j.name} (from its checkpoint)" if (j.folder / "checkpoint").is_dir() else j.name
            for j in claimed(state_dir / "jobs")]


#: Worker records (state/workers/) of workers stopped or silent longer than this are not listed.
FORGET_WORKER_SECONDS = 86400.0


def workers(state_dir: Path, now: float | None = None) -> list[dict]:
    """The `nstd worker` records (queue.backend celery), each cleaned like status.json, by name;
    those stopped or silent for a day are left out."""
    now = time.time() if now is None else now
    out = []
    try:
        names = sorted(n for n in os.listdir(state_dir / "workers") if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return out
    for name in names[:1000]:
        data = read_status(state_dir / "workers", name)
        if data is None or now - data["updated_at"] > FORGET_WORKER_SECONDS:
            continue
        out.append({**data, "name": data.get("name") if isinstance(data.get("name"), str) else name[:-5]})
    return out


def cluster_counts(data: dict, workers: list[dict]) -> dict:
    """Jobs done, failed (and by kind) and cancelled in a cluster: the workers deliver; the intake
    quarantines from the inbox."""
    kinds = dict(data.get("failed_kinds") or {})
    for w in workers:
        for kind, n in (w.get("failed_kinds") or {}).items():
            kinds[kind] = kinds.get(kind, 0) + n
    return {"done": data.get("done", 0) + sum(w["done"] for w in workers),
            "failed": data.get("failed", 0) + sum(w["failed"] for w in workers),
            "cancelled": data.get("cancelled", 0) + sum(w.get("cancelled", 0) for w in workers),
            "failed_kinds": kinds}


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about a whole group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
