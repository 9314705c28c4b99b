"""hooks.on_done and hooks.on_failed: an operator's command run after each job ends.

Like paperless-ngx's post-consume script: the command gets the job in its environment
(NSTD_EVENT, NSTD_JOB, NSTD_JOB_DIR, NSTD_RESULT or NSTD_ERROR_KIND / NSTD_ERROR_MESSAGE), runs
on a thread of its own, one at a time, so a slow hook never holds up the next job, and is killed
(its whole process group) after hooks.timeout_seconds. A hook that fails, hangs or cannot start
is logged, never fatal. The command is split like a shell line (shlex) but run without a shell:
nothing a user names (a job name, a message) is ever interpreted as shell code.
"""
from __future__ import annotations

import os
import queue
import select
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from loguru import logger

#: Hook runs waiting for their turn; more are dropped with a warning (a hook slower than jobs).
MAX_WAITING = 1000
#: Characters of a hook's output kept for the log.
OUTPUT_KEPT = 2000


@dataclass
class HookRun:
    event: str  # "done" or "failed"
    command: str
    env: dict[str, str]
    job: str


class Hooks(threading.Thread):
    def __init__(self, cfg: dict):
        super().__init__(name="hooks", daemon=True)
        self.cfg = cfg  # a reload hands over a new one (Daemon._hand_out): the next hook uses it
        self._q: "queue.Queue[HookRun | None]" = queue.Queue(maxsize=MAX_WAITING)

    def done(self, job: str, folder: str, result: str) -> None:
        self._submit("done", job, {"NSTD_JOB_DIR": folder, "NSTD_RESULT": result})

    def failed(self, job: str, folder: str, kind: str, message: str) -> None:
        self._submit("failed", job, {"NSTD_JOB_DIR": folder, "NSTD_ERROR_KIND": kind, "NSTD_ERROR_MESSAGE": message})

    def _submit(self, event: str, job: str, env: dict[str, str]) -> None:
        command = self.cfg["hooks"][f"on_{event}"]
        if not command:
            return
        run = HookRun(event, command, {"NSTD_EVENT": event, "NSTD_JOB": job, **env}, job)
        if not self.is_alive():
            self.run_one(run)
            return
        try:
            self._q.put_nowait(run)
        except queue.Full:
            logger.bind(job=job).warning("hooks.on_{}: {} runs already wait; this one is skipped", event, MAX_WAITING)

    def close(self, timeout: float) -> None:
        """Run what waits (each within its timeout), but give up after `timeout` seconds."""
        if self.is_alive():
            try:
                self._q.put(None, timeout=1)
            except queue.Full:
                pass
            self.join(timeout)

    def run(self) -> None:
        while (run := self._q.get()) is not None:
            try:
                self.run_one(run)
            except Exception as exc:  # a hook never takes the daemon down
                logger.bind(job=run.job).error("hooks.on_{} failed: {}", run.event, exc)

    def run_one(self, run: HookRun) -> None:
        log = logger.bind(job=run.job)
        timeout = self.cfg["hooks"]["timeout_seconds"]
        env = {**os.environ, **{k: _text(v) for k, v in run.env.items()}}
        try:
            argv = shlex.split(run.command)
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except (OSError, ValueError) as exc:
            log.error("hooks.on_{}: cannot run {!r}: {}", run.event, run.command, exc)
            return
        assert proc.stdout is not None
        try:
            tail, timed_out = _wait_keeping_tail(proc, timeout)
        finally:
            proc.stdout.close()
        text = _printable(tail.decode("utf-8", "replace").strip())
        if timed_out:
            log.error("hooks.on_{}: {!r} still running after {:g} s (hooks.timeout_seconds); killed",
                      run.event, run.command, timeout)
        elif proc.returncode != 0:
            log.error("hooks.on_{}: {!r} exited with {}{}", run.event, run.command, proc.returncode,
                      f": {text}" if text else "")
        else:
            log.info("hooks.on_{}: {!r} ran{}", run.event, run.command, f": {text}" if text else "")


def _wait_keeping_tail(proc: subprocess.Popen, timeout: float) -> tuple[bytes, bool]:
    """Read the hook's output as it comes, keeping only its last OUTPUT_KEPT bytes, until it exits
    or `timeout` passes (then its process group is killed). A child it left behind that still
    holds the pipe (a daemonised helper) gets a second at most: then reading stops."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    tail = bytearray()
    deadline = time.monotonic() + timeout
    exited_at: float | None = None
    eof = False
    while True:
        now = time.monotonic()
        if proc.poll() is not None:
            exited_at = exited_at or now
            if eof or now - exited_at > 1.0:
                return bytes(tail), False
        elif now >= deadline:
            _kill_group(proc)
            proc.wait()
            return bytes(tail), True
        if eof:  # the hook closed its output but runs on: wait for it without reading
            try:
                proc.wait(timeout=min(0.2, max(0.0, deadline - now)))
            except subprocess.TimeoutExpired:
                pass
            continue
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                eof = True
            tail += chunk
            del tail[:-OUTPUT_KEPT]


def _printable(text: str) -> str:
    """A hook's output for one log line: control characters (a NUL, an escape) shown as '?'."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def _text(value: str) -> str:
    """An environment value: a name that is not valid text keeps its bytes (surrogateescape)."""
    return value.replace("\0", "")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
