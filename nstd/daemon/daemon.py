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
from typing import Callable

from loguru import logger

from nstd import logs
from nstd.daemon import cancel
from nstd.daemon.expiry import Expiry
from nstd.daemon.inbox import Readiness, list_sidecars
from nstd.daemon.hooks import Hooks
from nstd.daemon.intake import Intake, wall
from nstd.daemon.live import Live
from nstd.daemon.lock import RootLock
from nstd.daemon.notify import Notifier, healthy
from nstd.daemon.outcome import Outcomes
from nstd.daemon.queue import RETRY_SECONDS, JobQueue
from nstd.daemon.status import Status
from nstd.daemon.store import Folders, Store
from nstd.daemon.watcher import InboxWatcher
from nstd.daemon.worker import Worker
from nstd.engine.device import resolve as resolve_device, resolve_all
from nstd.errors import ErrorKind, ExitCode, JobError, NstdError, Stage

TICK = 0.25
STATUS_EVERY = 5.0

#: Settings that only a restart applies (SIGHUP names them in a warning).
RESTART_KEYS = ("paths", "engine", "gpu.devices", "watch.polling", "watch.poll_interval_seconds", "web",
                "queue.backend", "queue.broker", "queue.name")


#: The RESTART_KEYS inside the sections a reload otherwise replaces whole.
RESTART_KEYS_IN = {"queue": ("backend", "broker", "name")}


class Daemon:
    def __init__(self, cfg: dict, reload_config: Callable[[], dict] | None = None, until_empty: bool = False):
        """`reload_config` reads the configuration again for SIGHUP (the CLI's config.yaml);
        `until_empty` ends the run once there is nothing left to take (`nstd run --until-empty`)."""
        self.cfg = cfg
        self.until_empty = until_empty
        self.reload_config = reload_config or (lambda: cfg)
        self.folders = Folders.from_config(cfg)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.stop_requested = False
        #: queue.backend celery: `nstd worker`s elsewhere run the jobs; this process only takes them in
        self.cluster = cfg["queue"]["backend"] == "celery"
        self.queue = JobQueue()
        self.dispatcher = None
        self.workers: list[Worker] = []
        self.notify = Notifier()
        #: cancel requests acted on that could not be removed
        self.cancels_stuck: set[str] = set()
        #: queue.backend celery: cancels that failed, not tried again before this (monotonic)
        self.cancel_retry_at: dict[str, float] = {}

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
        needs_restart = [key for key in RESTART_KEYS if _get(self.cfg, key) != _get(new, key)]
        for section in ("defaults", "limits", "queue", "service", "logging", "hooks", "outbox"):
            kept = {k: self.cfg[section][k] for k in RESTART_KEYS_IN.get(section, ())}
            self.cfg[section] = {**new[section], **kept}
        for key in ("settle_seconds", "missing_timeout", "rescan_seconds"):
            self.cfg["watch"][key] = new["watch"][key]
        for key in ("vram_budget_mb", "cpu_fallback"):
            self.cfg["gpu"][key] = new["gpu"][key]
        self.readiness.configure(self.cfg["watch"]["settle_seconds"], self.cfg["watch"]["missing_timeout"],
                                 self.cfg["limits"]["max_sidecar_bytes"], self.cfg["defaults"])
        for worker in self.workers:
            worker.cap_memory()
        if needs_restart:
            logger.warning("configuration reloaded; these settings need a restart to take effect: {}",
                           ", ".join(needs_restart))
        else:
            logger.info("configuration reloaded")

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
        if self.cluster:
            devices = []  # the workers' machines have the GPUs
        else:
            devices = resolve_all(self.cfg["gpu"]["devices"]) or [resolve_device(self.cfg["engine"]["device"])]
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
        if not self.cluster:
            self._refuse_a_live_cluster()
        recovered = self.store.recover(cluster=self.cluster)
        if self.cluster:
            try:
                from nstd.distributed.dispatch import ClusterQueue, Dispatcher
            except ImportError as exc:
                raise NstdError(f"queue.backend celery needs the distributed extra ({exc}): "
                                "pip install 'nstd[distributed]'") from None
            self.dispatcher = Dispatcher(self.cfg, self.folders.jobs)
            self.queue = ClusterQueue(self.dispatcher)
            recovered = []  # on the board already: the dispatcher sends them, the workers judge their attempts
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
        max_attempts = self.cfg["queue"]["max_attempts"]
        for job in recovered:
            if job.attempts >= max_attempts:
                self.outcomes.quarantine(job, JobError(
                    ErrorKind.CRASHED, f"the daemon stopped during this job {job.attempts} times "
                    f"(queue.max_attempts={max_attempts})", Stage.RUN))
            else:
                logger.bind(job=job.name).info("found in state after a restart; queued again")
                self.queue.put(job)
        self.status.update(force=True, backend=self.cfg["queue"]["backend"],
                           device=", ".join(f"{w.engine.device} ({w.engine.device.name})" for w in self.workers)
                           or self._cluster_device())
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.page = self._start_page()
        self.watcher = InboxWatcher(self.folders.inbox, w["polling"], w["poll_interval_seconds"], self.wake)
        self.watcher.start()
        for worker in self.workers:
            worker.start()
        logger.info("watching {} ({})", self.folders.inbox, "polling" if w["polling"] else "inotify")

    def _refuse_a_live_cluster(self) -> None:
        """queue.backend local on a root where `nstd worker`s run: their jobs would run twice, and
        their deliveries be rolled back under them."""
        from nstd.daemon.status import workers as worker_records
        from nstd.distributed import board

        lease_seconds = self.cfg["queue"]["lease_seconds"]
        now = time.time()
        live = [w["name"] for w in worker_records(self.folders.state, now)
                if w.get("state") != "stopped" and now - w["updated_at"] < lease_seconds]
        leased = [e.name for e in board.scan(self.folders.jobs) if e.taken(lease_seconds)]
        if leased and not live:
            # A lease is judged by watching it (nstd/distributed/lease.py): a dead cluster's stop renewing.
            logger.info("jobs held by a worker ({}): watching their leases for up to {:g} s",
                        ", ".join(leased), lease_seconds)
            end = time.monotonic() + lease_seconds + 1
            while leased and time.monotonic() < end:
                time.sleep(0.5)
                leased = [e.name for e in board.scan(self.folders.jobs) if e.taken(lease_seconds)]
        if live or leased:
            self.lock.release()
            raise NstdError(f"queue.backend is local, but this root has a cluster at work (workers: "
                            f"{', '.join(live) or 'none heard from'}; jobs held by a worker: {', '.join(leased) or 'none'}); "
                            "set queue.backend: celery as the workers have it, or stop them (docs/distributed.md)")

    def _cluster_device(self) -> str:
        from nstd.distributed.broker import redact

        return f"nstd worker processes (queue {self.cfg['queue']['name']!r} at {redact(self.cfg['queue']['broker'])})"

    def _start_page(self):
        """The status page (web.enabled) in a process of its own, or None; a page that cannot start
        never stops the daemon."""
        if not self.cfg["web"]["enabled"]:
            return None
        from nstd.web.launch import StatusPage

        page = StatusPage(self.cfg["web"], self.folders, Path(self.cfg["paths"]["root"]))
        self.status.update(force=True, web=page.start())
        return page

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
            for job_id in cancel.requests(self.folders.state):
                if job_id.startswith(cancel.INBOX_PREFIX):
                    self.cancel_in_inbox(job_id)
                elif self.cluster:
                    try:
                        self.cancel_in_cluster(job_id)
                    except Exception as exc:  # a lease folder nstd cannot read, say: never the intake's end
                        logger.error("cannot cancel {} now ({}); trying again in {:g} s", job_id, exc, RETRY_SECONDS)
                        self.cancel_retry_at[job_id] = time.monotonic() + RETRY_SECONDS
                elif job_id not in self.cancels_stuck:
                    self.cancel(job_id)
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

    def cancel_in_cluster(self, job_id: str) -> None:
        """queue.backend celery: a job nobody holds is leased here and quarantined; a running one's
        request is left for its worker, which stops it at its next step and removes the request."""
        from nstd.daemon.claim import Claim
        from nstd.distributed import lease

        folder = self.folders.jobs / job_id
        if time.monotonic() < self.cancel_retry_at.get(job_id, 0.0):
            return
        if not folder.is_dir():
            if cancel.answered(self.folders.state, job_id):
                logger.warning("nstd cancel {}: no such job is queued or running (finished meanwhile?)", job_id)
            else:
                logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", cancel.REQUESTS, job_id)
                self.cancel_retry_at[job_id] = float("inf")
            return
        held = lease.Lease.acquire(folder, "intake", self.cfg["queue"]["lease_seconds"])
        if held is None:
            if job_id not in self.cancels_stuck:
                cur = lease.current(folder)
                logger.info("cancelling {}: its worker {} stops it at its next step", job_id, cur.holder if cur else "?")
                self.cancels_stuck.add(job_id)
            return
        try:
            self.store.reclaim(job_id)  # a dead worker's unfinished move, back into state first
            job = Claim.from_folder(folder)
            logger.bind(job=job.name, job_id=job.id).warning("cancelled while queued (nstd cancel)")
            self.outcomes.quarantine(job, cancel.cancelled_error(Stage.QUEUE))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("cannot cancel {} now ({}); trying again in {:g} s", job_id, exc, RETRY_SECONDS)
            self.cancel_retry_at[job_id] = time.monotonic() + RETRY_SECONDS
            return
        finally:
            held.release()
        self.cancel_retry_at.pop(job_id, None)
        self.cancels_stuck.discard(job_id)
        cancel.answered(self.folders.state, job_id)

    def cancel_in_inbox(self, key: str) -> None:
        """A request for a job still in the inbox: quarantined as cancelled, with the files it
        names (those another waiting job names stay), before it is taken."""
        sidecar = cancel.inbox_request(self.folders.state, key)
        if not cancel.answered(self.folders.state, key):
            if key in self.cancels_stuck:
                return
            self.cancels_stuck.add(key)
            logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", cancel.REQUESTS, key)
        pending = self.readiness.pending.get(self.folders.inbox / sidecar) if sidecar else None
        if pending is None:
            logger.warning("nstd cancel: {} is not waiting in the inbox (taken or gone meanwhile?)", sidecar or key)
            return
        logger.bind(job=pending.sidecar.stem).warning("cancelled while waiting in the inbox (nstd cancel)")
        self.intake.take(pending, cancel.cancelled_error(Stage.INTAKE, " while it waited in the inbox"))

    def cancel(self, job_id: str) -> None:
        """A request from `nstd cancel`: a queued job goes to quarantine now, a running one stops
        at its next step (the worker quarantines it)."""
        if not cancel.answered(self.folders.state, job_id):
            self.cancels_stuck.add(job_id)  # acted on once; not again every tick
            logger.warning("cannot remove the cancel request state/{}/{}: remove it by hand", cancel.REQUESTS, job_id)
        where, job = self.queue.cancel(job_id)
        if job is not None:
            logger.bind(job=job.name, job_id=job.id).warning("cancelled while queued (nstd cancel)")
            try:
                self.outcomes.quarantine(job, cancel.cancelled_error(Stage.QUEUE))
            except OSError as exc:
                self.outcomes.retry_later(job, exc)
        elif where == "running":
            logger.info("cancelling the running job {} at its next step (nstd cancel)", job_id)
        else:
            logger.warning("nstd cancel {}: no such job is queued or running (finished meanwhile?)", job_id)

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
        if self.dispatcher is not None:
            self.dispatcher.close()
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


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _refuse_start(exc: Exception) -> int:
    """One line on stderr (journald under systemd, at priority err), and the same into logs/nstd.log
    if it is open."""
    logger.bind(file_only=True).error("cannot start: {}", exc)
    print(f"{logs.journal_prefix(3)}nstd: error: {exc}", file=sys.stderr)
    return getattr(exc, "exit_code", ExitCode.BAD_INPUT)


def run_daemon(cfg: dict, reload_config: Callable[[], dict] | None = None, until_empty: bool = False) -> int:
    daemon = Daemon(cfg, reload_config, until_empty)
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
