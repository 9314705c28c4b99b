"""The queue and the serial worker: one job at a time per device, inside a memory budget.

The worker owns an `Engine` (network loaded once), caches style targets by file content, size and
layers, fits each job into `gpu.vram_budget_mb` from the predicted peak, and on out-of-memory
retries smaller, then on the CPU (if allowed), else quarantines the job.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import dataclasses
import itertools
import json
import platform
import queue
import resource
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import yaml
from loguru import logger
from PIL import Image

from nstd import __version__, logs
from nstd.fsutil import atomic_open
from nstd.engine import Checkpoint, Engine, ImageError, Interrupted, Result, StepInfo, images
from nstd.engine.device import Device
from nstd.engine.memory import fit_size
from nstd.job import JobError, style_params
from nstd.status import Status, iso
from nstd.store import Claimed, Store, safe_component

#: Give up shrinking below this long edge.
MIN_EDGE = 64
SHRINK = 0.75
#: A job whose results could be written neither to the outbox nor to quarantine waits this long.
RETRY_SECONDS = 60.0


class JobQueue:
    """Highest priority first, then the job file that arrived first. Thread-safe."""

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()

    def put(self, job: Claimed, not_before: float = 0.0) -> None:
        """Queue a job; `not_before` (time.monotonic()) holds it back, for a retry after a failure."""
        with self._cond:
            rec = job.record
            key = (-int(rec.get("priority", 0)), rec.get("arrived", rec["claimed_at"]), rec["claimed_at"], next(self._seq))
            heapq.heappush(self._heap, (key, not_before, job))
            self._cond.notify()

    def get(self, timeout: float) -> Claimed | None:
        with self._cond:
            entry = self._first_ready()
            if entry is None:
                self._cond.wait(timeout)
                entry = self._first_ready()
            if entry is None:
                return None
            self._heap.remove(entry)
            heapq.heapify(self._heap)
            return entry[2]

    def _first_ready(self) -> tuple | None:
        if self._heap and self._heap[0][1] <= time.monotonic():
            return self._heap[0]  # the common case: the best job is not held back
        now = time.monotonic()
        return next((e for e in sorted(self._heap, key=lambda e: e[0]) if e[1] <= now), None)

    def names(self) -> list[str]:
        with self._cond:
            return [e[2].name for e in sorted(self._heap, key=lambda e: e[0])]

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)


class StyleCache:
    """Gram targets keyed by (style file digest, long edge, layers, pooling); least recently used goes."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], dict]) -> dict:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = compute()
        self._items[key] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Optimised:
    """A job whose picture is made: what the finisher needs to encode, report and deliver it."""

    job: Claimed
    result: Result
    size_requested: int
    timings: dict[str, float]
    oom_retries: int
    cpu_fallback: bool
    style_cache: dict[str, int]
    peak_rss_bytes: int


class Finisher(threading.Thread):
    """Encodes and delivers finished jobs while the worker optimises the next one.

    One job may wait while one is being finished; a third blocks the worker, so memory stays
    bounded. A crash before delivery loses nothing: the job is still in state and runs again.
    """

    def __init__(self, finish: Callable[[Optimised], None], failed: Callable[[Optimised, Exception], None],
                 name: str):
        super().__init__(name=name, daemon=True)
        self._finish, self._failed = finish, failed
        self._q: "queue.Queue[Optimised | None]" = queue.Queue(maxsize=1)

    def submit(self, done: Optimised) -> None:
        """Hand a job over; without a running finisher thread (a worker driven by hand), finish it here."""
        if self.is_alive():
            self._q.put(done)
        else:
            self._finish_one(done)

    def close(self) -> None:
        """Finish what was handed over, then end the thread."""
        if self.is_alive():
            self._q.put(None)
            self.join()

    def run(self) -> None:
        while (done := self._q.get()) is not None:
            self._finish_one(done)

    def _finish_one(self, done: Optimised) -> None:
        try:
            self._finish(done)
        except Exception as exc:  # the finisher must outlive any job; the job stays in state
            self._failed(done, exc)


class Worker(threading.Thread):
    """Runs claimed jobs one after another on one device."""

    def __init__(self, cfg: dict, device: Device | str, queue: JobQueue, store: Store, status: Status,
                 engine_factory: Callable[..., Engine] = Engine):
        super().__init__(name=f"worker-{device}", daemon=True)
        self.cfg = cfg
        self.queue = queue
        self.store = store
        self.status = status
        self.engine_factory = engine_factory
        e = cfg["engine"]
        self.engine = engine_factory(weights=e["weights"], weights_file=e["weights_file"], device=device,
                                     precision=e["precision"], lbfgs_history=e["lbfgs_history"])
        self._cpu_engine: Engine | None = None
        self.cache = StyleCache()
        self.stopping = threading.Event()
        self.stop_deadline = float("inf")
        self.current: Claimed | None = None
        self.heartbeat = time.monotonic()
        self.finisher = Finisher(self.finish, lambda done, exc: self._retry_later(done.job, exc),
                                 name=f"finisher-{device}")
        self.cap_memory()

    def cap_memory(self) -> None:
        """Cap the GPU's allocator at `gpu.vram_budget_mb` (at start and after a reload)."""
        self.engine.device.cap_memory(self.cfg["gpu"]["vram_budget_mb"] * 2**20)

    def begin_stop(self, grace_seconds: float) -> None:
        """Take no new job; the running one may go on for `grace_seconds`, then stops at a step."""
        self.stop_deadline = time.monotonic() + grace_seconds
        self.stopping.set()

    def _should_stop(self) -> bool:
        return self.stopping.is_set() and time.monotonic() >= self.stop_deadline

    def run(self) -> None:
        self.finisher.start()
        try:
            self._take_jobs()
        finally:
            self.finisher.close()  # a stop waits for the last result to reach the outbox

    def _take_jobs(self) -> None:
        while not self.stopping.is_set():
            self.heartbeat = time.monotonic()
            job = self.queue.get(timeout=0.5)
            if job is None:
                continue
            try:
                self.process(job)
            except Exception as exc:  # the worker must outlive any job; the job stays in state
                self._retry_later(job, exc)

    def _retry_later(self, job: Claimed, exc: Exception) -> None:
        """A job that failed for a reason of nstd's, not the user's: log it and queue it again."""
        logger.bind(job=job.name).opt(exception=exc).error("could not finish the job ({}); retrying in {:g} s",
                                                           exc, RETRY_SECONDS)
        self.queue.put(job, not_before=time.monotonic() + RETRY_SECONDS)

    # ------------------------------------------------------------------ one job

    def process(self, job: Claimed) -> None:
        self.current = job
        log = logger.bind(job=job.name, job_id=job.id)
        job.record["attempts"] = job.record.get("attempts", 0) + 1
        job.record.setdefault("started_at", []).append(time.time())
        job.save()  # the attempt counts before anything can crash
        log_path = job.log_path
        try:
            with logs.job_file(job.id, log_path):
                log.info("started (attempt {}) on {}", job.record["attempts"], self.engine.device)
                try:
                    done = self.run_job(job, log)
                except Interrupted as exc:
                    self._save_checkpoint(job, exc.checkpoint)
                    # An orderly stop is not a crash: give the attempt back.
                    job.record["attempts"] -= 1
                    job.save()
                    log.warning("stopped at step {} for shutdown; it resumes from there at the next start",
                                exc.checkpoint.step)
                    return
                except JobError as exc:
                    log.error("{}: {}", exc.kind, exc.message)
                    self.quarantine(job, exc, log_path)
                    return
                except Exception as exc:  # a bug or an engine failure must not end the daemon
                    self._internal_error(job, exc, log, "run")
                    return
        finally:
            self.current = None
            self.status.update(force=True, running=None, queue=self.queue.names())
        # Encoding and the move to the outbox overlap the next job's optimisation.
        self.finisher.submit(done)

    def _internal_error(self, job: Claimed, exc: Exception, log, stage: str) -> None:
        """A bug or an engine/encoder failure: quarantine the job with the traceback in its log."""
        log.error("internal error: {}\n{}", exc, traceback.format_exc())
        self.quarantine(job, JobError("internal error", f"{type(exc).__name__}: {exc}", stage), job.log_path)

    def finish(self, done: Optimised) -> None:
        """On the finisher thread: encode, report and deliver one optimised job."""
        job, log_path = done.job, done.job.log_path
        log = logger.bind(job=job.name, job_id=job.id)
        with logs.job_file(job.id, log_path):
            try:
                outputs = self.encode(done)
            except Exception as exc:  # an encoder failure quarantines the job, the daemon goes on
                self._internal_error(job, exc, log, "encode")
                return
            log.info("finished; writing to the outbox")
        outputs["job.log"] = log_path.read_bytes()
        try:
            final = self.store.deliver(job, outputs)
        except OSError as exc:
            self._deliver_failed(job, exc, log, log_path)
            return
        logger.bind(job=job.name).info("delivered to {}", final)
        self.status.count("done")

    def _deliver_failed(self, job: Claimed, exc: OSError, log, log_path: Path) -> None:
        """The outbox could not be written (the transfer was rolled back): quarantine with the
        reason, or if that cannot be written either, keep the job in state and retry later."""
        reason = f"cannot write the outbox: {exc.strerror or exc} ({getattr(exc, 'filename', '') or self.store.f.outbox})"
        with logs.job_file(job.id, log_path):
            log.error(reason)
        try:
            self.quarantine(job, JobError("cannot write outbox", reason, "deliver"), log_path)
        except OSError as exc2:
            logger.bind(job=job.name).error("cannot write quarantine either ({}); the job stays queued and is "
                                            "retried in {:g} s", exc2.strerror or exc2, RETRY_SECONDS)
            self.queue.put(job, not_before=time.monotonic() + RETRY_SECONDS)

    def quarantine(self, job: Claimed, exc: JobError, log_path: Path) -> None:
        error = {
            "job": job.name,
            "stage": exc.stage,
            "kind": exc.kind,
            "message": exc.message,
            "attempts": job.record.get("attempts", 0),
            "times": {"claimed": iso(job.record["claimed_at"]), "failed": iso(time.time())},
        }
        text = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
        final = self.store.quarantine_claimed(job, error, text)
        logger.bind(job=job.name).warning("quarantined in {}: {}", final, exc.message)
        self.status.count("failed")

    def run_job(self, job: Claimed, log) -> Optimised:
        """Decode, fit, and optimise: everything that needs the device. Encoding is the finisher's."""
        t0 = time.time()
        rec = job.record
        settings = rec["settings"]
        max_pixels = self.cfg["limits"]["max_pixels"]
        try:
            content = images.open_image(job.input("content"), max_pixels)
            style_paths = [job.input(f"style{i}") for i in range(len(rec["style_weights"]))]
            styles = [images.open_image(p, max_pixels) for p in style_paths]
            init = images.open_image(job.input("init"), max_pixels) if "init" in rec["files"] else None
        except ImageError as exc:
            raise JobError("bad image", str(exc), "run") from None
        digests = [file_digest(p) for p in style_paths]
        params = style_params(settings)
        t_loaded = time.time()

        resume = self._load_checkpoint(job)
        if resume is not None:
            log.info("resuming from the checkpoint at step {} of {}", resume.step, params.steps)
        engine, size, oom_retries, fallback = self.engine, params.size, 0, False
        if engine.device.type == "cuda":
            size = self._fit_budget(content, params, engine)
            if size < params.size:
                log.info("size {} lowered to {} to fit gpu.vram_budget_mb={}", params.size, size,
                         self.cfg["gpu"]["vram_budget_mb"])
        t_opt = time.time()
        while True:
            p = dataclasses.replace(params, size=size)
            try:
                result, grams_seconds = self._stylize(engine, content, styles, digests, rec["style_weights"], p,
                                                      init, job, log, resume)
                break
            except Exception as exc:
                if not is_oom(exc):
                    raise
                oom_retries += 1
                engine.device.free_cache()
                self.cache.clear()
                smaller = int(size * SHRINK)
                if smaller >= MIN_EDGE and engine.device.type == "cuda":
                    log.warning("out of memory at {} px; retrying at {} px", size, smaller)
                    size = smaller
                    continue
                if self.cfg["gpu"]["cpu_fallback"] and engine.device.type != "cpu":
                    log.warning("out of memory at {} px; finishing on the CPU at {} px", size, params.size)
                    engine, size, fallback = self._cpu(), params.size, True
                    continue
                raise JobError("out of memory", f"out of memory at {size} px on {engine.device}", "run") from None
        t_done = time.time()
        targets = grams_seconds + result.timings["prepare"]
        log.info("done: {}x{} in {:.1f} s, losses {}", *result.size, t_done - t_opt,
                 ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items()))
        return Optimised(
            job=job, result=result, size_requested=params.size,
            timings={
                "waited": round(t0 - rec.get("first_seen", rec["claimed_at"]), 3),  # seen in the inbox -> started
                "loaded": round(t_loaded - t0, 3),  # decode + style digests
                "targets": round(targets, 3),  # style Grams (unless cached) + content features
                "optimised": round(t_done - t_opt - targets, 3),  # the optimiser's loop, OOM retries included
            },
            oom_retries=oom_retries, cpu_fallback=fallback,
            style_cache={"hits": self.cache.hits, "misses": self.cache.misses},
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )

    def encode(self, done: Optimised) -> dict[str, bytes]:
        """The result, the GIF, job.yaml and report.json, as bytes for the outbox."""
        t_start = time.time()
        job, result = done.job, done.result
        rec = job.record
        settings = rec["settings"]
        fmt = settings["output"]["format"]
        stem = safe_component(job.name)
        outputs = {f"{stem}.{fmt}": images.encode(result.image, fmt)}
        if settings["gif"] and result.frames:
            buf = io.BytesIO()
            images.save_gif_to(result.frames, buf, settings["gif"]["fps"])
            outputs[f"{stem}.gif"] = buf.getvalue()
        encoded = time.time() - t_start
        effective = {"content": rec["origins_by_role"]["content"],
                     "style": [{"path": rec["origins_by_role"][f"style{i}"], "weight": w}
                               for i, w in enumerate(rec["style_weights"])],
                     **settings}
        outputs["job.yaml"] = yaml.safe_dump(effective, sort_keys=False, allow_unicode=True).encode()
        report = {
            "job": job.name,
            "status": "done",
            "attempts": rec["attempts"],
            "timings": {**done.timings, "encoded": round(encoded, 3)},  # encoded: result + GIF
            "steps": result.steps,
            "resumed_from_step": result.resumed_from or None,
            "steps_run": result.steps - result.resumed_from,
            "losses": result.losses,
            "device": result.device,
            "device_name": result.device_name,
            "precision": result.precision,
            "size_requested": done.size_requested,
            "size_used": list(result.size),
            "oom_retries": done.oom_retries,
            "cpu_fallback": done.cpu_fallback,
            "peak_memory_bytes": result.peak_memory_bytes,
            "peak_rss_bytes": done.peak_rss_bytes,
            "style_cache": done.style_cache,
            "weights": self.cfg["engine"]["weights"],
            "versions": {"nstd": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        outputs["report.json"] = json.dumps(report, indent=1).encode()
        return outputs

    def _fit_budget(self, content, params, engine) -> int:
        w, h = images.fit_long_edge(content.size, params.size)
        layers = list(dict.fromkeys((*params.content_layers, *params.style_layers)))
        fit = fit_size(h, w, self.cfg["gpu"]["vram_budget_mb"] * 2**20, min_long_edge=MIN_EDGE, layers=layers,
                       optimizer=params.optimizer, history=engine.lbfgs_history, precision=engine.precision,
                       pooling=params.pooling, device=engine.device.type)
        return max(fit) if fit else MIN_EDGE

    def _cpu(self) -> Engine:
        if self._cpu_engine is None:
            e = self.cfg["engine"]
            self._cpu_engine = self.engine_factory(weights=e["weights"], weights_file=e["weights_file"], device="cpu",
                                                   precision=e["precision"], lbfgs_history=e["lbfgs_history"])
        return self._cpu_engine

    def _stylize(self, engine, content, styles, digests, weights, p, init, job, log, resume):
        """Run the engine with the style targets from the cache; returns the result and the seconds
        spent on the targets (a miss computes them; a batch sharing one style pays once)."""
        t0 = time.perf_counter()
        edge = max(16, round(max(images.fit_long_edge(content.size, p.size)) * p.style_scale))
        grams = [
            self.cache.get((d, edge, p.style_layers, p.pooling, str(engine.device)),
                           lambda img=img: engine.style_grams(img, edge, p.style_layers, p.pooling))
            for d, img in zip(digests, styles)
        ]
        grams_seconds = time.perf_counter() - t0
        every = max(1, p.steps // 20)
        name = job.name

        def on_step(info: StepInfo) -> None:
            self.heartbeat = time.monotonic()
            eta = info.elapsed / info.step * (info.steps - info.step)
            self.status.update(running={"name": name, "step": info.step, "steps": info.steps,
                                        "eta_seconds": round(eta, 1), "device": str(engine.device)},
                               queue=self.queue.names())
            if info.step % every == 0 or info.step == info.steps:
                loss = info.losses()["total"]
                log.info("step {}/{} loss {:.4g} eta {:.0f} s", info.step, info.steps, loss, eta)

        result = engine.stylize(content, [(img, w) for img, w in zip(styles, weights)], p, init_image=init,
                                on_step=on_step, style_grams=grams, resume=resume,
                                checkpoint_every=self.cfg["service"]["checkpoint_every"],
                                on_checkpoint=lambda cp: self._save_checkpoint(job, cp, log),
                                should_stop=self._should_stop)
        return result, grams_seconds

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, job: Claimed, cp: Checkpoint, log=None) -> None:
        """The current image (float32, lossless) and the GIF frames so far, in the job's state folder."""
        folder = job.dir / "checkpoint"
        frames_dir = folder / "frames"
        frames_dir.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(cp.frames):
            path = frames_dir / f"{i:05d}.png"
            if not path.exists():
                images.save(frame, path, "png")
        with atomic_open(folder / "checkpoint.pt") as fh:
            torch.save({"step": cp.step, "image": cp.image, "frames": len(cp.frames)}, fh)
        if log is not None:
            log.debug("checkpoint at step {}", cp.step)

    def _load_checkpoint(self, job: Claimed) -> Checkpoint | None:
        folder = job.dir / "checkpoint"
        try:
            data = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
            frames = []
            for i in range(int(data["frames"])):
                with Image.open(folder / "frames" / f"{i:05d}.png") as img:
                    frames.append(img.convert("RGB"))
            return Checkpoint(int(data["step"]), data["image"].float(), frames)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged checkpoint costs the progress, never the job
            logger.bind(job=job.name).warning("ignoring an unreadable checkpoint: {}", exc)
            return None

