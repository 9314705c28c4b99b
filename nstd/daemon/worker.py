"""The serial worker: one job at a time on one device, inside a memory budget.

Its steps read as verbs: take a job, perform it (decode, fit the budget, optimise, walking the
out-of-memory ladder: smaller, then the CPU, else quarantine), then hand it to the finisher, or
quarantine it, or queue it again. The network is loaded once; style targets are cached across jobs.
"""
from __future__ import annotations

import hashlib
import resource
import threading
import time
from pathlib import Path
from typing import Callable

from loguru import logger

from nstd import logs
from nstd.config import memory_budget
from nstd.daemon import diskroom
from nstd.daemon.outcome import Finisher, Optimised, Outcomes
from nstd.daemon.jobprogress import JobProgress
from nstd.daemon.queue import RETRY_SECONDS, JobQueue
from nstd.engine import Device, Engine, ImageError, Interrupted, StyleImage, TargetCache, images, regions
from nstd.engine.device import is_oom
from nstd.engine.memory import predict_peak_bytes
from nstd.engine.options import mask_ratio_problem
from nstd.engine.styleloss import StyleLossError
from nstd.errors import ErrorKind, JobError, Stage
from nstd.job.spec import Job
from nstd.state import checkpoints, safefs
from nstd.state.claim import Claim
from nstd.state.live import Live
from nstd.state.requests import cancelled_error
from nstd.state.status import Status
from nstd.state.store import Store

#: Give up shrinking below this long edge.
MIN_EDGE = 64
SHRINK = 0.75

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Worker(threading.Thread):
    """Runs claimed jobs one after another on one device."""

    def __init__(self, cfg: dict, device: Device | str, jobs: JobQueue, store: Store, status: Status,
                 engine_factory: Callable[..., Engine] = Engine, outcomes: Outcomes | None = None,
                 live: Live | None = None):
        super().__init__(name=f"worker-{device}", daemon=True)
        self.cfg, self.queue, self.store, self.status = cfg, jobs, store, status
        self.engine_factory = engine_factory
        self.engine = self._engine(device)
        self._cpu_engine: Engine | None = None
        self.cache = TargetCache()
        self.outcomes = outcomes or Outcomes(cfg, store, status, jobs)
        self.live = live or Live()  # what the status page shows of the running job
        self.stopping = threading.Event()
        self.stop_deadline = float("inf")
        self.current: Claim | None = None
        self.job_deadline = float("inf")  # the running job's limits.max_job_seconds, on the monotonic clock
        self.job_key = ""  # the running job's checkpoints.job_key, once its inputs are read
        #: who runs the jobs, for job.log (an `nstd worker` names itself and its host)
        self.label = ""
        self.heartbeat = time.monotonic()
        self.finisher = Finisher(self.outcomes.finish, self.outcomes.retry_later, name=f"finisher-{device}")
        #: checkpoints are written off this thread
        self.checkpoints = checkpoints.Writer(name=f"checkpoints-{device}")
        self.cap_memory()

    def _engine(self, device: Device | str) -> Engine:
        e = self.cfg["engine"]
        return self.engine_factory(weights=e["weights"], weights_file=e["weights_file"], device=device,
                                   precision=e["precision"], lbfgs_history=e["lbfgs_history"],
                                   cuda_graphs=e["cuda_graphs"])

    def cap_memory(self) -> None:
        """Cap the GPU's allocator at `gpu.vram_budget_mb` (at start and after a reload); warn when
        even the smallest job cannot fit it."""
        budget_mb = self.cfg["gpu"]["vram_budget_mb"]
        if self.engine.device.cap_memory(budget_mb * 2**20) is None:
            return
        smallest = predict_peak_bytes(MIN_EDGE, MIN_EDGE, ("conv1_1", "conv5_1"), history=self.engine.lbfgs_history,
                                      precision=self.engine.precision, device="cuda")
        if smallest > budget_mb * 2**20:
            logger.warning("gpu.vram_budget_mb={} is below what the smallest job needs on {} (about {} MiB): every "
                           "job will run out of memory there and go to the CPU or to quarantine", budget_mb,
                           self.engine.device, smallest >> 20)

    def begin_stop(self, grace_seconds: float) -> None:
        """Take no new job; the running one may go on for `grace_seconds`, then stops at a step."""
        self.stop_deadline = time.monotonic() + grace_seconds
        self.stopping.set()

    def should_stop(self) -> bool:
        return self.stopping.is_set() and time.monotonic() >= self.stop_deadline

    def over_time(self) -> bool:
        """The running job has run past `limits.max_job_seconds` (counted from this run's start)."""
        return time.monotonic() >= self.job_deadline

    def run(self) -> None:
        self.engine.device.make_current()
        self.finisher.start()
        try:
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                job = self.queue.get(timeout=0.5)
                if job is not None:
                    try:
                        self.process(job)
                    except Exception as exc:  # the worker must outlive any job; the job stays in state
                        self.outcomes.retry_later(job, exc)
        finally:
            self.finisher.close()  # a stop waits for the last result to reach the outbox

    # ------------------------------------------------------------------ one job

    def process(self, job: Claim) -> None:
        """Perform one job, then hand it on: to the finisher, to quarantine, or back to the queue."""
        try:
            spec = Job.of(job.settings)  # the job's keys, typed once for this run of it
            if not self._room_for(job, spec):
                return
            self._process(job, spec)
        finally:
            self.queue.done(job.id)  # after the hand-over: the job is never in no one's hands

    def _room_for(self, job: Claim, spec: Job) -> bool:
        """Room on disk for the job's result, GIF and checkpoints (nstd/daemon/diskroom.py); if
        not, it is held for RETRY_SECONDS with the reason (status, log), no attempt counted."""
        why = diskroom.shortfall(self.store.outbox, self.store.f.state, spec, self.cfg["limits"]["min_free_mb"])
        held = dict(self.status.data.get("held") or {})
        if why is None:
            if held.pop(job.name, None) is not None:
                self.status.update(force=True, held=held)
            return True
        if held.get(job.name) != why:  # said once, not at every try
            logger.bind(job=job.name, job_id=job.id).warning("{}; tried again every {:g} s", why, RETRY_SECONDS)
            self.status.update(force=True, held={**held, job.name: why})
        self.queue.hold(job, RETRY_SECONDS, why)
        return False

    def _process(self, job: Claim, spec: Job) -> None:
        self.current = job
        self.live.begin(job.name)
        log = logger.bind(job=job.name, job_id=job.id)
        job.begin_attempt()
        limit = self.cfg["limits"]["max_job_seconds"]
        t_start = time.monotonic()
        self.job_deadline, self.job_key = (t_start + limit if limit else float("inf")), ""
        try:
            with logs.job_file(job.id, job.log_path):
                log.info("started (attempt {}) on {}{}", job.attempts, self.engine.device, self.label)
                try:
                    try:
                        done = self.perform(job, spec, log)
                    finally:
                        self.checkpoints.discard()  # one still waiting is older than what follows
                except Interrupted as exc:
                    if self.queue.lost(job.id):
                        log.warning("stopped at step {}: this worker's lease on the job was lost (it stalled "
                                    "past queue.lease_seconds); its new holder runs it", exc.checkpoint.step)
                        return
                    if self.queue.is_cancelled(job.id):
                        log.warning("cancelled at step {} (nstd cancel)", exc.checkpoint.step)
                        self.outcomes.quarantine(job, cancelled_error(Stage.RUN, f" at step {exc.checkpoint.step}"))
                        return
                    if self.over_time():
                        self._over_time(job, exc, limit, time.monotonic() - t_start, log)
                        return
                    if exc.checkpoint.image is not None:  # None: stopped before its first picture
                        checkpoints.save(self.store.checkpoint_dir(job), exc.checkpoint)
                    job.give_back_attempt()
                    log.warning("stopped at step {} for shutdown; it resumes from there at the next start",
                                exc.checkpoint.step)
                    return
                except JobError as exc:
                    log.error("{}: {}", exc.kind, exc.message)
                    self.outcomes.quarantine(job, exc)
                    return
                except Exception as exc:  # a bug or an engine failure must not end the daemon
                    self.outcomes.internal_error(job, exc, Stage.RUN)
                    return
        finally:
            self.current = None
            self.live.end()
            self.status.update(force=True, running=None, queue=self.queue.names())
        # Encoding and the move to the outbox overlap the next job's optimisation.
        self.finisher.submit(done)

    def _over_time(self, job: Claim, exc: Interrupted, limit: float, ran: float, log) -> None:
        """Stopped over `limits.max_job_seconds`: quarantined as over limit, its checkpoint kept in
        state/kept so that the same job retried (under a larger limit) goes on from that step."""
        step = exc.checkpoint.step
        kept = False
        if self.job_key and exc.checkpoint.image is not None:
            folder = self.store.checkpoint_dir(job)
            try:
                checkpoints.save(folder, exc.checkpoint)
                checkpoints.keep(folder, self.store.kept, self.job_key)
                kept = True
            except OSError as err:
                log.warning("could not keep the checkpoint at step {}: {}", step, err)
        log.warning("stopped at step {} after {:.0f} s: over limits.max_job_seconds={:g}", step, ran, limit)
        self.outcomes.quarantine(job, JobError(
            ErrorKind.OVER_LIMIT, f"stopped at step {step} after {ran:.0f} s, over limits.max_job_seconds={limit:g}"
            + ("; its checkpoint is kept: nstd retry (under a larger limit) goes on from that step" if kept else ""),
            Stage.RUN))

    def perform(self, job: Claim, spec: Job, log) -> Optimised:
        """Decode, fit, and optimise: everything that needs the device. Encoding is the finisher's."""
        t0 = time.time()
        max_pixels = self.cfg["limits"]["max_pixels"]
        decoded: dict[str, tuple] = {}  # a file named several times is decoded (and hashed) once

        def image(inp):
            if inp.file not in decoded:
                self._unchanged_since_claim(job.path(inp))
                decoded[inp.file] = (images.open_image(job.path(inp), max_pixels), file_digest(job.path(inp)))
            return decoded[inp.file]

        try:  # intake decoded these; a failure now means the file changed since
            content = image(job.content)[0]
            styles = [StyleImage(image(s)[0], s.weight, image(s)[1], mask=image(s.mask)[0] if s.mask else None)
                      for s in job.styles]
            init = image(job.init)[0] if job.init else None
            keep = image(job.keep)[0] if job.keep else None  # regions that stay the content
        except ImageError as exc:
            raise JobError(ErrorKind.INPUT_CHANGED, f"{exc} (it was readable when the job was taken)", Stage.RUN) from None
        masks = [*((f"style[{i}].mask", f.mask, s.mask) for i, (f, s) in enumerate(zip(job.styles, styles))),
                 ("keep", job.keep, keep)]
        for key, source, mask in masks:
            if mask is not None and (why := mask_ratio_problem(key, source.origin, mask.size, content.size)):
                raise JobError(ErrorKind.INPUT_CHANGED, f"{why} (it fitted when the job was taken)", Stage.RUN)
        params = spec.params()
        t_loaded = time.time()

        roles = [f"content {image(job.content)[1]}", *(f"style {s.weight} {image(s)[1]}" + (
                     f" mask {image(s.mask)[1]}" if s.mask else "") for s in job.styles),
                 *([f"init {image(job.init)[1]}"] if job.init else []),
                 *([f"keep {image(job.keep)[1]}"] if job.keep else [])]
        self.job_key = checkpoints.job_key(job.settings, roles)
        resume = checkpoints.load(self.store.checkpoint_dir(job), log)
        if resume is None and checkpoints.adopt(self.store.kept, self.job_key, self.store.checkpoint_dir(job)):
            resume = checkpoints.load(self.store.checkpoint_dir(job), log)
            if resume is not None:
                log.info("this job went over limits.max_job_seconds before; its checkpoint was kept")
        engine, oom_retries, fallback = self.engine, 0, False
        masked = regions.count(styles, keep)  # the memory model counts a masked region's copies
        size = self._fit_budget(content.size, params, engine, log, masked)
        self._runnable(engine, content, styles, params, size)
        sizes = (content.size, [s.image.size for s in styles])  # the stages that run count (Engine.plan)
        if resume is not None:
            log.info("resuming from the checkpoint at step {} of {}", resume.step,
                     params.at_size(size).total_steps(*sizes))
        t_opt = time.time()
        while True:
            p = params.at_size(size)
            try:
                result = engine.stylize(content, styles, p, init_image=init, cache=self.cache, resume=resume, keep=keep,
                                        progress=JobProgress(self, job, engine.device, p.total_steps(*sizes)),
                                        budget_bytes=self.budget(engine)[0])
                break
            except Exception as exc:
                if not is_oom(exc):
                    raise
                log.debug("out of memory: {}", exc)
            # Outside the except block: the failed attempt's tensors are released before the cache is.
            oom_retries += 1
            self.cache.clear()
            engine.device.free_cache()
            smaller = int(size * SHRINK)
            if smaller >= MIN_EDGE and engine.device.is_cuda and self._runnable(engine, content, styles, params,
                                                                                smaller, raises=False):
                log.warning("out of memory at {} px; retrying at {} px", size, smaller)
                size = smaller
            elif self.cfg["gpu"]["cpu_fallback"] and engine.device.is_cuda:
                failed_at, engine, fallback = size, self._cpu(), True
                size = self._fit_budget(content.size, params, engine, log, masked)
                self._runnable(engine, content, styles, params, size)
                log.warning("out of memory at {} px; finishing on the CPU at {} px", failed_at, size)
            else:
                raise JobError(ErrorKind.OUT_OF_MEMORY, f"out of memory at {size} px on {engine.device}", Stage.RUN)
        t_done = time.time()
        targets = result.timings["targets"]
        log.info("done: {}x{} in {:.1f} s, losses {}", *result.size, t_done - t_opt,
                 ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items()))
        return Optimised(
            job=job, spec=spec, result=result, size_requested=params.size,
            timings={
                "waited": round(t0 - job.times.first_seen, 3),  # seen in the inbox -> started
                "loaded": round(t_loaded - t0, 3),  # decode + style digests
                "targets": round(targets, 3),  # style Grams (unless cached) + content features
                "optimised": round(t_done - t_opt - targets, 3),  # the optimiser's loop, OOM retries included
            },
            oom_retries=oom_retries, cpu_fallback=fallback, style_cache=self.cache.counts(),
            budget_bytes=self.budget(engine)[0],
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )

    def _unchanged_since_claim(self, path: Path) -> None:
        """A dropper holding a descriptor can still write to a file after its claim moved it:
        one grown past the limits (or into a sparse giant) is refused before it is hashed."""
        st = path.stat()
        limit = self.cfg["limits"]["max_input_bytes"]
        if st.st_size > limit or safefs.is_sparse(st):
            raise JobError(ErrorKind.INPUT_CHANGED, f"{path.name}: now {st.st_size:,} bytes ({st.st_blocks * 512:,} "
                           f"on disk); it changed after the job was taken (limits.max_input_bytes={limit:,})", Stage.RUN)

    def budget(self, engine: Engine) -> tuple[int, str]:
        """(bytes a job may peak at on `engine`'s device, the setting that says so)."""
        return memory_budget(self.cfg, engine.device.is_cuda)

    def _fit_budget(self, content_size: tuple[int, int], params, engine: Engine, log, masked: int = 0) -> int:
        """The result's long edge inside the device's budget (Engine.fit: memory techniques first)."""
        budget, setting = self.budget(engine)
        try:
            size = engine.fit(content_size, params, budget, smallest=MIN_EDGE, regions=masked)
        except StyleLossError as exc:  # style_loss sliced: no tiles, and the untiled pass is over the budget
            raise JobError(ErrorKind.OUT_OF_MEMORY, f"{exc} ({setting})", Stage.RUN) from None
        if size < params.size:
            log.info("size {} lowered to {} to fit {}", params.size, size, setting)
        return size

    def _runnable(self, engine: Engine, content, styles, params, size: int, raises: bool = True) -> bool:
        """A size lowered to fit memory may leave the picture too thin for the network (a
        1600x32 panorama at 64 px): the job is refused with both reasons, not crashed inside the
        engine. `raises=False`: just whether it is runnable (an out-of-memory retry's smaller size)."""
        if size >= params.size:
            return True  # the size asked: the intake has checked it
        try:
            engine.plan(content, styles, params.at_size(size))
            return True
        except ValueError as exc:
            if not raises:
                return False
            setting = self.budget(engine)[1]
            raise JobError(ErrorKind.OUT_OF_MEMORY, f"{params.size} px does not fit {setting} on {engine.device}, and "
                           f"at {size} px, the largest that does, {exc}", Stage.RUN) from None

    def _cpu(self) -> Engine:
        if self._cpu_engine is None:
            self._cpu_engine = self._engine("cpu")
        return self._cpu_engine
