"""`nstd run`: the intake loop that turns dropped files into queued jobs, and the workers.

inbox -> (settled, validated, images decoded) -> claim into state -> queue -> worker -> outbox.
Anything wrong with a user's files ends in quarantine with the reason; nothing a user drops can
stop the daemon.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from loguru import logger

from nstd import logs
from nstd.config import ConfigError, load_config
from nstd.engine import ImageError, WeightsError, images
from nstd.engine.device import resolve as resolve_device, resolve_all
from nstd.inbox import Pending, Readiness, list_sidecars
from nstd.job import JobError, job_name, job_settings
from nstd.service import Notifier, healthy
from nstd.status import Status, iso
from nstd.store import Folders, Store
from nstd.watcher import InboxWatcher
from nstd.worker import JobQueue, Worker

TICK = 0.25
STATUS_EVERY = 5.0
#: After a claim or quarantine that could not be written, wait this long before trying again.
HOLD_SECONDS = 30.0

#: Settings that only a restart applies (SIGHUP names them in a warning).
RESTART_KEYS = ("paths", "engine", "gpu.devices", "watch.polling", "watch.poll_interval_seconds")


class Daemon:
    def __init__(self, cfg: dict, config_path: Path | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.folders = Folders.from_config(cfg)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.queue = JobQueue()
        self.workers: list[Worker] = []
        self.notify = Notifier()

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

    def request_reload(self, *_args) -> None:
        self.reload_requested = True
        self.wake.set()

    def reload(self) -> None:
        """SIGHUP: job defaults, limits, watch timings, queue, budget and logging apply to the next job."""
        self.reload_requested = False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            logger.error("reload failed; keeping the running configuration: {}", exc)
            return
        needs_restart = [key for key in RESTART_KEYS if _get(self.cfg, key) != _get(new, key)]
        for section in ("defaults", "limits", "queue", "service", "logging"):
            self.cfg[section] = new[section]
        for key in ("settle_seconds", "missing_timeout", "rescan_seconds"):
            self.cfg["watch"][key] = new["watch"][key]
        for key in ("vram_budget_mb", "cpu_fallback"):
            self.cfg["gpu"][key] = new["gpu"][key]
        logs.setup(self.cfg["logging"], self.folders.logs)
        r = self.readiness
        r.settle_seconds, r.missing_timeout = self.cfg["watch"]["settle_seconds"], self.cfg["watch"]["missing_timeout"]
        r.max_sidecar_bytes = self.cfg["limits"]["max_sidecar_bytes"]
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
        devices = resolve_all(self.cfg["gpu"]["devices"]) or [resolve_device(self.cfg["engine"]["device"])]
        self.folders.check_layout()
        self.folders.create()
        logs.setup(self.cfg["logging"], self.folders.logs)
        self.store = Store(self.folders)
        self.status = Status(self.folders.state)
        self.status.update(force=True, state="starting")
        w = self.cfg["watch"]
        self.readiness = Readiness(w["settle_seconds"], w["missing_timeout"], self.cfg["limits"]["max_sidecar_bytes"],
                                   self.folders.inbox)
        recovered = self.store.recover()
        for dev in devices:
            worker = Worker(self.cfg, dev, self.queue, self.store, self.status)
            logger.info("network {} loaded on {} ({})", self.cfg["engine"]["weights"], worker.engine.device,
                        worker.engine.precision)
            self.workers.append(worker)
        max_attempts = self.cfg["queue"]["max_attempts"]
        for job in recovered:
            if job.record.get("attempts", 0) >= max_attempts:
                self.workers[0].quarantine(
                    job, JobError("crashed", f"the daemon stopped during this job {job.record['attempts']} times "
                                  f"(queue.max_attempts={max_attempts})", "run"), job.log_path)
            else:
                logger.bind(job=job.name).info("found in state after a restart; queued again")
                self.queue.put(job)
        self.watcher = InboxWatcher(self.folders.inbox, w["polling"], w["poll_interval_seconds"], self.wake)
        self.watcher.start()
        for worker in self.workers:
            worker.start()
        logger.info("watching {} ({})", self.folders.inbox, "polling" if w["polling"] else "inotify")

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
            if self.stop.is_set():
                break
            if self.reload_requested:
                self.reload()
            self.watcher.ensure_alive()
            if ping_every and now >= next_ping and self.healthy():
                self.notify.watchdog()
                next_ping = now + ping_every
            if ready and now >= next_status:
                self.notify.status(self.status_line())
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
            for verdict in self.readiness.check():
                try:
                    self.handle(verdict.pending, verdict.error)
                except Exception as exc:  # a bug on one job must not stop the intake of the others
                    logger.bind(job=verdict.pending.sidecar.name).exception("intake failed: {}", exc)
                    verdict.pending.hold_until = time.monotonic() + HOLD_SECONDS
            self.status.update(waiting=len(self.readiness.pending), queue=self.queue.names())
            if not ready:
                # The network is loaded, the inbox watched and scanned once: now systemd may call us up.
                ready = True
                self.notify.ready(self.status_line())
                logger.info("ready")

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
        self.status.update(force=True, state="stopped", running=None)
        logger.info("stopped")

    # ------------------------------------------------------------------ intake

    def handle(self, p: Pending, error: JobError | None) -> None:
        """A sidecar that is ready (error None) or judged: claim it, or quarantine it."""
        name = job_name(p.sidecar)
        log = logger.bind(job=name, job_id=f"intake:{p.sidecar}")
        with logs.captured(f"intake:{p.sidecar}") as lines:
            try:
                if error is not None:
                    raise error
                record = self._validate(p, log)
            except JobError as exc:
                log.error("{}: {}", exc.kind, exc.message)
                self._quarantine_inbox(p, name, exc, lines)
                return
            except Exception as exc:  # unexpected: keep the job, keep the daemon
                log.exception("could not take the job: {}", exc)
                self._quarantine_inbox(p, name, JobError("internal error", f"{type(exc).__name__}: {exc}"), lines)
                return
            files = p.files
            roles = {"content": files.content, **{f"style{i}": s for i, (s, _) in enumerate(files.styles)},
                     **({"init": files.init} if files.init else {}), "sidecar": files.sidecar}
            shared = self.readiness.waiting_references(exclude=p.sidecar) & set(roles.values())
            record["origins_by_role"] = {r: str(path.relative_to(self.folders.inbox)) for r, path in roles.items()}
            try:
                job = self.store.claim(name, roles, shared, record)
            except OSError as exc:  # rolled back: the files are still in the inbox
                log.error("cannot claim: {}; trying again in {:g} s", exc, HOLD_SECONDS)
                p.hold_until = time.monotonic() + HOLD_SECONDS
                return
            self.readiness.forget(p.sidecar)
            log.info("claimed as {} (priority {}){}", job.id, record["priority"],
                     f"; kept {len(shared)} shared file(s) in the inbox" if shared else "")
        (job.log_path).write_text("".join(lines), encoding="utf-8")
        self.queue.put(job)

    def _validate(self, p: Pending, log) -> dict:
        """Settings and images checked before a job is queued: a bad image never reaches a worker."""
        assert p.data is not None and p.files is not None
        settings = job_settings(p.data, self.cfg["defaults"])
        max_pixels = self.cfg["limits"]["max_pixels"]
        for path in p.files.inputs()[:-1]:
            try:
                img = images.open_image(path, max_pixels)
            except ImageError as exc:
                raise JobError("bad image", str(exc)) from None
            log.debug("{}: {}x{}", path.name, *img.size)
        return {
            "settings": settings,
            "priority": settings["priority"],
            "style_weights": [w for _, w in p.files.styles],
            "first_seen": time.time() - (time.monotonic() - p.first_seen),
            "arrived": p.arrived,
        }

    def _quarantine_inbox(self, p: Pending, name: str, exc: JobError, lines: list[str]) -> None:
        files = [p.sidecar]
        if p.files is not None:
            files = [f for f in p.files.inputs() if f.exists()]
        else:
            files += convention_files(p.sidecar)
        shared = self.readiness.waiting_references(exclude=p.sidecar) & set(files)
        error = {"job": name, "stage": exc.stage, "kind": exc.kind, "message": exc.message, "attempts": 0,
                 "times": {"seen": iso(time.time() - (time.monotonic() - p.first_seen)), "failed": iso(time.time())}}
        try:
            final = self.store.quarantine_from_inbox(name, files, shared, error, "".join(lines))
        except OSError as exc2:  # rolled back: the files are still in the inbox
            logger.bind(job=name).error("could not quarantine: {}; trying again in {:g} s", exc2, HOLD_SECONDS)
            p.hold_until = time.monotonic() + HOLD_SECONDS
            return
        self.readiness.forget(p.sidecar)
        logger.bind(job=name).warning("quarantined in {}: {}", final, exc.message)
        self.status.count("failed")


def convention_files(sidecar: Path) -> list[Path]:
    """`<name>.content.*` and `<name>.style.*` beside a sidecar that could not be read."""
    stem = job_name(sidecar)
    return sorted(p for p in sidecar.parent.glob(f"{stem}.*") if p != sidecar and p.is_file()
                  and p.name.split(".")[-2] in ("content", "style") and p.name.rsplit(".", 2)[0] == stem)



def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _refuse_start(what: str, exc: Exception, code: int) -> int:
    """One line on stderr (journald under systemd), and the same into logs/nstd.log if it is open."""
    logger.bind(file_only=True).error("{}: {}", what, exc)
    print(f"nstd: error: {exc}", file=sys.stderr)
    return code


def run_daemon(cfg: dict, config_path: Path | None = None) -> int:
    daemon = Daemon(cfg, config_path)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
    logger.remove()  # until logs.setup(): a start-up error is the one line printed below
    try:
        daemon.start()
    except (ValueError, OSError) as exc:
        return _refuse_start("cannot start", exc, 2)
    except WeightsError as exc:
        return _refuse_start("cannot load the weights", exc, 3)
    try:
        daemon.run()
    finally:
        daemon.shutdown()
    return 0
