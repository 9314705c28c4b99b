"""`nstd run`: the intake loop that turns dropped files into queued jobs, and the workers.

inbox -> (settled, validated, images decoded) -> claim into state -> queue -> worker -> outbox.
Anything wrong with a user's files ends in quarantine with the reason; nothing a user drops can
stop the daemon.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from loguru import logger

from nstd import logs
from nstd.config import reloaded
from nstd.daemon.backend import Backend
from nstd.daemon.expiry import Expiry
from nstd.daemon.hooks import Hooks
from nstd.daemon.inbox import Readiness, list_sidecars
from nstd.daemon.intake import Intake, wall
from nstd.daemon.notify import Notifier, healthy
from nstd.daemon.outcome import Outcomes
from nstd.daemon.watcher import InboxWatcher
from nstd.daemon.worker import Worker
from nstd.errors import ExitCode, NstdError, Stage
from nstd.state import requests
from nstd.state.folders import Folders
from nstd.state.live import Live
from nstd.state.lock import RootLock
from nstd.state.status import Status
from nstd.state.store import Store

TICK = 0.25
STATUS_EVERY = 5.0

class Page(Protocol):
    """The status page's process (nstd/web/launch.py), started and watched by the daemon."""

    def start(self) -> str | None: ...

    def ensure_alive(self) -> str | None: ...

    def stop(self) -> None: ...


class Daemon:
    def __init__(self, cfg: dict, backend: Backend, page: Page | None = None,
                 reload_config: Callable[[], dict] | None = None, until_empty: bool = False):
        """`backend` runs the claimed jobs (nstd/daemon/backend.py); `page` is the status page, if
        any (both picked by nstd/commands/run.py); `reload_config` reads the configuration again
        for SIGHUP (the CLI's config.yaml); `until_empty` ends the run once there is nothing left
        to take (`nstd run --until-empty`)."""
        self.cfg = cfg
        self.backend = backend
        self.page = page
        self.until_empty = until_empty
        self.reload_config = reload_config or (lambda: cfg)
        self.folders = Folders.from_config(cfg)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.stop_requested = False
        self.queue = backend.queue
        self.workers: list[Worker] = []
        self.notify = Notifier()
        #: inbox cancel requests acted on that could not be removed
        self.cancels_stuck: set[str] = set()

    def request_stop(self, *_args) -> None:
        """SIGTERM/SIGINT: take no new job; the running one gets shutdown_grace_seconds."""
        grace = self.cfg["service"]["shutdown_grace_seconds"]
        if not self.stop.is_set():
            logger.info("stopping: no new job is taken; the running one has {:g} s to finish", grace)
        self.stop.set()
        for worker in self.workers:
            if not worker.stopping.is_set():
                worker.begin_stop(grace)
        self.wake.set()

    def on_signal(self, signum: int, _frame) -> None:
        """SIGTERM/SIGINT ask for a stop, SIGHUP for a reload. A handler only sets a flag, which the
        intake loop reads within a tick: it may run while the main thread holds a lock (an
        Event's, the logger's), and taking that lock again here would deadlock (a burst of
        SIGHUPs did)."""
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def reload(self) -> None:
        """SIGHUP: job defaults, limits, watch timings, queue, budget and logging apply to the next job."""
        self.reload_requested = False
        try:
            new = self.reload_config()
        except NstdError as exc:
            logger.error("reload failed; keeping the running configuration: {}", exc)
            return
        try:  # a value the validator took and loguru refuses must not take the logs down
            logs.setup(new["logging"], self.folders.logs)
        except Exception as exc:
            logs.setup(self.cfg["logging"], self.folders.logs)
            logger.error("reload refused; keeping the running configuration: logging: {}", exc)
            return
        cfg, needs_restart = reloaded(self.cfg, new)
        self._hand_out(cfg)
        self.readiness.configure(self.cfg["watch"]["settle_seconds"], self.cfg["watch"]["missing_timeout"],
                                 self.cfg["limits"]["max_sidecar_bytes"], self.cfg["defaults"])
        for worker in self.workers:
            worker.cap_memory()
        if needs_restart:
            logger.warning("configuration reloaded; these settings need a restart to take effect: {}",
                           ", ".join(needs_restart))
        else:
            logger.info("configuration reloaded")

    def _hand_out(self, cfg: dict) -> None:
        """A reloaded configuration to every part that reads one: each takes the new dict whole
        (at its next job, its next hook, its next tick); none is changed under a reader."""
        self.cfg = cfg
        for part in (self.intake, self.outcomes, self.hooks, self.expiry, *self.workers):
            part.cfg = cfg
        self.backend.reconfigure(cfg)

    def status_line(self) -> str:
        running = next((w.current for w in self.workers if w.current is not None), None)
        run = self.status.data.get("running") or {}
        head = f"running {running.name} step {run.get('step', 0)}/{run.get('steps', '?')}" if running else "idle"
        return (f"{head}; {len(self.queue)} queued, {len(self.readiness.pending)} waiting; "
                f"{self.status.data['done']} done, {self.status.data['failed']} failed")

    def healthy(self) -> bool:
        limit = self.notify.watchdog_seconds or float("inf")
        return healthy(self.watcher.alive(), [(w.is_alive(), w.heartbeat) for w in self.workers], limit)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Folders, logging, recovery, the network(s), the watcher. Raises on a start-up problem."""
        # Devices first: a GPU that is not there is a one-line error before anything is touched.
        devices = self.backend.devices()
        self.folders.check_layout()
        root = Path(self.cfg["paths"]["root"])
        self.folders.create(root)
        self.folders.check_modes(root)
        self.lock = RootLock(self.folders.state, wait_seconds=5)  # before anything is touched
        logs.setup(self.cfg["logging"], self.folders.logs)
        self.store = Store(self.folders)
        self.status = Status(self.folders.state)
        self.expiry = Expiry(self.cfg, self.folders.outbox, self.status)
        self.status.update(force=True, state="starting")
        w = self.cfg["watch"]
        self.readiness = Readiness(w["settle_seconds"], w["missing_timeout"], self.cfg["limits"]["max_sidecar_bytes"],
                                   self.folders.inbox, self.cfg["defaults"])
        try:
            self.backend.check_root(self.folders)
        except Exception:
            self.lock.release()
            raise
        recovered = self.backend.recover(self.store)
        self.hooks = Hooks(self.cfg)
        self.hooks.start()
        self.live = Live(self.folders.state)
        self.outcomes = Outcomes(self.cfg, self.store, self.status, self.queue, self.hooks, self.live)
        self.intake = Intake(self.cfg, self.readiness, self.store, self.outcomes, self.queue)
        for dev in devices:
            worker = Worker(self.cfg, dev, self.queue, self.store, self.status, outcomes=self.outcomes, live=self.live)
            logger.info("network {} loaded on {} ({})", self.cfg["engine"]["weights"], worker.engine.device,
                        worker.engine.precision)
            self.workers.append(worker)
        for job in recovered:
            if not self.outcomes.crashed_too_often(job, "the daemon"):
                logger.bind(job=job.name).info("found in state after a restart; queued again")
                self.queue.put(job)
        self.status.update(force=True, backend=self.cfg["queue"]["backend"],
                           device=", ".join(f"{w.engine.device} ({w.engine.device.name})" for w in self.workers)
                           or self.backend.runner())
        self.backend.start(self.store, self.outcomes)
        if self.page is not None:  # a page that cannot start never stops the daemon (it says why)
            self.status.update(force=True, web=self.page.start())
        self.watcher = InboxWatcher(self.folders.inbox, w["polling"], w["poll_interval_seconds"], self.wake)
        self.watcher.start()
        for worker in self.workers:
            worker.start()
        logger.info("watching {} ({})", self.folders.inbox, "polling" if w["polling"] else "inotify")

    def memory_in_use(self) -> str:
        """For the status page: the allocator's bytes on each GPU, and the process's RSS."""
        used = [(w.engine.device, w.engine.device.allocated_bytes()) for w in self.workers]
        parts = [f"{u / 2**20:.0f} MiB on {dev}" for dev, u in used if u is not None]
        rss = _rss_bytes()
        return ", ".join([*parts, *([f"{rss / 2**20:.0f} MiB RSS"] if rss else [])])

    def run(self) -> None:
        """The intake loop, until a stop is requested."""
        next_scan = 0.0
        inbox_ok = True
        ready = False
        next_ping = next_status = 0.0
        ping_every = (self.notify.watchdog_seconds or 0) / 3
        self.status.update(force=True, state="running", queue=self.queue.names())
        while not self.stop.is_set():
            woke = self.wake.wait(TICK) if ready else True
            self.wake.clear()
            now = time.monotonic()
            if self.stop_requested:
                self.request_stop()
            if self.stop.is_set():
                break
            if self.reload_requested:
                try:
                    self.reload()
                except Exception as exc:  # an admin's reload never ends the daemon
                    logger.exception("reload failed: {}", exc)
            self.watcher.ensure_alive()
            if ping_every and now >= next_ping and self.healthy():
                self.notify.watchdog()
                next_ping = now + ping_every
            if ready and now >= next_status:
                self.notify.status(self.status_line())
                self.status.update(memory=self.memory_in_use())
                if self.page is not None:
                    self.status.update(web=self.page.ensure_alive())
                next_status = now + STATUS_EVERY
            if woke or now >= next_scan:
                next_scan = now + self.cfg["watch"]["rescan_seconds"]
                try:
                    sidecars = list_sidecars(self.folders.inbox)
                    if not inbox_ok:
                        logger.info("the inbox is back")
                    inbox_ok = True
                except OSError as exc:
                    if inbox_ok:
                        logger.error("cannot read the inbox {}: {}", self.folders.inbox, exc)
                    inbox_ok = False
                    continue
                self.readiness.update(sidecars)
            for job_id in requests.requests(self.folders.state):
                if job_id.startswith(requests.INBOX_PREFIX):
                    self.cancel_in_inbox(job_id)
                else:
                    self.backend.cancel(job_id)
            for verdict in self.readiness.check():
                try:
                    self.intake.take(verdict.pending, verdict.error)
                except Exception as exc:  # a bug on one job must not stop the intake of the others
                    logger.bind(job=verdict.pending.sidecar.name).exception("intake failed: {}", exc)
                    verdict.pending.hold(f"intake failed: {type(exc).__name__}: {exc}")
            self.expiry.tick(now)
            self.status.update(waiting=self.readiness.waiting(), queue=self.queue.names(), live=self.live.as_json(),
                               worker_heartbeat_at=wall(min((w.heartbeat for w in self.workers), default=now)))
            if not ready:
                # The network is loaded, the inbox watched and scanned once: now systemd may call us up.
                ready = True
                self.notify.ready(self.status_line())
                logger.info("ready")
            elif self.until_empty and self.empty():
                for w in self.readiness.waiting():
                    logger.info("left in the inbox for the next run: {}: {}", w["job"], w["reason"])
                logger.info("nothing left to take ({}): exiting (--until-empty)", self.status_line())
                break

    def empty(self) -> bool:
        """Nothing queued, running or being delivered, and no job file in the inbox that could be
        taken now (a job waiting for a missing input, or held for a retry, is left for later)."""
        return not self.queue.busy() and self.readiness.settled() and all(w.finisher.idle() for w in self.workers)

    def cancel_in_inbox(self, key: str) -> None:
        """A request for a job still in the inbox: quarantined as cancelled, with the files it
        names (those another waiting job names stay), before it is taken."""
        sidecar = requests.inbox_request(self.folders.state, key)
        if not requests.answered(self.folders.state, key):
            if key in self.cancels_stuck:
                return
            self.cancels_stuck.add(key)
            logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", requests.REQUESTS, key)
        pending = self.readiness.pending.get(self.folders.inbox / sidecar) if sidecar else None
        if pending is None:
            logger.warning("nstd cancel: {} is not waiting in the inbox (taken or gone meanwhile?)", sidecar or key)
            return
        logger.bind(job=pending.sidecar.stem).warning("cancelled while waiting in the inbox (nstd cancel)")
        self.intake.take(pending, requests.cancelled_error(Stage.INTAKE, " while it waited in the inbox"))

    def shutdown(self) -> None:
        """Let the running job finish within the grace time (or stop at a step), then exit."""
        self.request_stop()
        self.notify.stopping(f"stopping: {self.status_line()}")
        grace = self.cfg["service"]["shutdown_grace_seconds"]
        deadline = time.monotonic() + grace
        for worker in self.workers:
            while worker.is_alive():
                # Keep systemd from killing a job that is finishing or writing its checkpoint.
                self.notify.extend_timeout(max(0.0, deadline - time.monotonic()) + 30)
                if self.notify.watchdog_seconds and self.healthy():
                    self.notify.watchdog()
                worker.join(timeout=1)
        self.watcher.stop()
        self.backend.close()
        if self.page is not None:
            self.page.stop()
        self.hooks.close(timeout=self.cfg["hooks"]["timeout_seconds"])
        self.status.update(force=True, state="stopped", running=None, live=self.live.as_json(), web=None)
        logger.info("stopped")
        self.lock.release()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _refuse_start(exc: Exception) -> int:
    """One line on stderr (journald under systemd, at priority err), and the same into logs/nstd.log
    if it is open."""
    logger.bind(file_only=True).error("cannot start: {}", exc)
    print(f"{logs.journal_prefix(3)}nstd: error: {exc}", file=sys.stderr)
    return getattr(exc, "exit_code", ExitCode.BAD_INPUT)


def run_daemon(cfg: dict, backend: Backend, page: Page | None = None,
               reload_config: Callable[[], dict] | None = None, until_empty: bool = False) -> int:
    daemon = Daemon(cfg, backend, page, reload_config, until_empty)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, daemon.on_signal)
    logger.remove()  # until logs.setup(): a start-up error is the one line printed below
    try:
        daemon.start()
    except (NstdError, ValueError, OSError) as exc:
        return _refuse_start(exc)
    try:
        daemon.run()
    finally:
        daemon.shutdown()
    return 0
