"""`nstd status`: state/status.json (and the cluster's worker records) in words, and the exit code
that says whether a daemon runs and answers. Torch-free: it answers in a tenth of a second."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nstd.commands.base import config_of
from nstd.errors import ExitCode
from nstd.logs import one_line
from nstd.state.lock import RootLock
from nstd.state.status import (STALE_SECONDS, WORKER_STALL_SECONDS, cluster_counts, pid_alive, read_status, resumable,
                               workers)
from nstd.timetext import clock as _clock
from nstd.timetext import duration


def _counts_line(c: dict) -> str:
    """'done: 4, failed: 3 (bad image 2, crashed 1), cancelled: 1'"""
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(c.get("failed_kinds", {}).items(), key=lambda kv: -kv[1]))
    return (f"done: {c.get('done', 0)}, failed: {c.get('failed', 0)}" + (f" ({kinds})" if kinds else "")
            + f", cancelled: {c.get('cancelled', 0)}")


def describe_worker(w: dict, now: float, lease_seconds: float) -> str:
    """One line of `nstd status` for a worker: host, device, what it does, its last heartbeat."""
    def text(key: str) -> str:
        v = w.get(key)
        return printable(v) if isinstance(v, str) else "?"

    age = now - w["updated_at"]
    head = f"{text('name')} on {text('host')}, {text('device')} ({text('device_name')})"
    run = w.get("running")
    doing = f"running {printable(run['name'])} step {run['step']}/{run['steps']}" if run else \
        (f"taking {text('job')}" if isinstance(w.get("job"), str) else "idle")
    if w.get("state") == "stopped":
        return f"{head}: stopped {duration(age)} ago"
    if age > lease_seconds:
        return (f"{head}: SILENT for {duration(age)} (last: {doing}); dead or cut off? its job runs elsewhere once "
                f"its lease ends (queue.lease_seconds={lease_seconds:g})")
    return f"{head}: {doing}; heard from {duration(age)} ago; {w['done']} done, {w['failed']} failed"


def _joined(lines: list[str]) -> str:
    """The lines for the operator's terminal: each is one line by construction, so whatever a
    name in it holds (a newline, ESC, a bidi control, a raw byte) is written as an escape and
    can neither forge a line nor drive the terminal."""
    return "\n".join(one_line(line) for line in lines)


def printable(s: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in s)[:200]


def describe(data: dict | None, now: float | None = None, resumable: list[str] | None = None,
             lock_held: bool | None = None, workers: list[dict] | None = None,
             lease_seconds: float = 60.0) -> tuple[str, bool]:
    """Human-readable status (of read_status()'s dict), and whether a daemon is running.
    `resumable` names the jobs that wait in state/ for the next start; `lock_held` says whether a
    process holds the root's lock, the surest sign of a daemon (None: unknown, the pid decides)."""
    now = time.time() if now is None else now
    resume_lines = [f"waiting to resume at the next start: {', '.join(resumable)}"] if resumable else []
    if data is None:
        if lock_held:
            return "a daemon holds the root but has written no status yet (starting?)", True
        return _joined(["no daemon is running (no status file yet)", *resume_lines]), False
    if lock_held is None:
        alive = pid_alive(data["pid"]) and data.get("state") != "stopped"
    else:
        alive = lock_held
    updated = data.get("updated_at", 0)
    lines = []
    if not alive:
        lines.append(f"no daemon is running (last status from {_clock(updated)}, pid {data.get('pid')})")
        lines.extend(resume_lines)
        return _joined(lines), False
    if now - updated > STALE_SECONDS:
        lines.append(f"nstd is NOT RESPONDING: pid {data.get('pid')} is alive but has not updated its status for "
                     f"{duration(now - updated)} (stopped with SIGSTOP or kill -STOP? hung?); the rest is as of {_clock(updated)}")
    else:
        lines.append(f"nstd is {data.get('state')} (pid {data.get('pid')}, up {duration(now - data.get('started_at', now))})")
    run = data.get("running")
    if data.get("backend") == "celery":
        lines.append(f"workers: {len(workers or [])}" + ("" if workers else
                     " (none has started: run `nstd worker` on each GPU machine; docs/distributed.md)"))
        lines.extend(f"  {describe_worker(w, now, lease_seconds)}" for w in workers or [])
    elif run:
        eta = run.get("eta_seconds")
        eta_text = f", ETA {duration(eta)}" if isinstance(eta, (int, float)) else ""
        lines.append(f"running: {run['name']} step {run.get('step', 0)}/{run.get('steps', '?')}{eta_text} on {run.get('device')}")
        beat = data.get("worker_heartbeat_at", now)
        if now - beat > WORKER_STALL_SECONDS:
            lines.append(f"  the worker has not finished a step for {duration(now - beat)}: stalled?")
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
        deadline = f"; quarantined as missing input in {duration(left)}" if isinstance(left, (int, float)) else ""
        lines.append(f"  {w['job']}: {w['reason']}{deadline}")
    if len(waiting) > 20:
        lines.append(f"  ... and {len(waiting) - 20} more (nstd status --json lists all)")
    for name, why in list((data.get("held") or {}).items())[:20]:
        lines.append(f"held: {name}: {why}")
    gone = data.get("expired")
    if gone:
        lines.append(f"outbox: {gone['count']} result(s) older than {gone['days']:g} days removed since the start "
                     f"(outbox.keep_days), the last at {_clock(gone['at'])}: {', '.join(gone['names'])}")
    if data.get("backend") == "celery":
        lines.append(f"{_counts_line(cluster_counts(data, workers or []))} "
                     "(by the workers listed and the intake, each since it started)")
    else:
        lines.append(f"{_counts_line(data)} (since this daemon started, {_clock(data.get('started_at', 0))})")
    return _joined(lines), True


def main(args: argparse.Namespace) -> int:
    cfg = config_of(args, required=True)
    state = Path(cfg["paths"]["state"])
    data = read_status(state)
    cluster = workers(state)
    text, alive = describe(data, resumable=resumable(state), lock_held=RootLock.held(state), workers=cluster,
                           lease_seconds=cfg["queue"]["lease_seconds"])
    responding = alive and (data is None or time.time() - data.get("updated_at", 0) <= STALE_SECONDS)
    if args.json:
        print(json.dumps({**(data or {}), "daemon_running": alive, "responding": responding,
                          **({"workers": cluster} if cluster else {})}, indent=1))
    else:
        print(text)
    if not alive:
        return ExitCode.NOT_RUNNING
    return ExitCode.OK if responding else ExitCode.NOT_RESPONDING
