"""What the status page shows of the running job, as the worker publishes it: its current picture
every few seconds, its losses, and the step and job times behind /metrics.

The page is served by a process of its own (nstd/web/server.py) that only reads what the daemon
writes: the picture as `state/live/preview.jpg` (encoded on the worker thread every
PREVIEW_SECONDS, a few milliseconds) and the rest inside status.json (`live`). The worker never
waits for the page, and the page can change nothing.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from nstd.fsutil import atomic_write_bytes

#: How often the running job's picture is published.
PREVIEW_SECONDS = 2.0
PREVIEW_FILE = "live/preview.jpg"
#: Losses kept for the plot (the oldest half is thinned when full).
MAX_POINTS = 200
#: Histogram buckets: a step's seconds, a job's seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class Histogram:
    """Cumulative buckets in the Prometheus way: counts[i] observations <= bounds[i]."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def as_json(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total, "count": self.n}


class Live:
    """Thread-safe: the worker writes, the intake loop copies it into status.json."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.preview_path = state_dir / PREVIEW_FILE if state_dir is not None else None
        self.job: str | None = None
        self.picture_step: int | None = None
        self.losses: list[tuple[int, float]] = []
        self.steps = Histogram(STEP_BUCKETS)
        self.jobs = Histogram(JOB_BUCKETS)
        self._last_step_at: float | None = None
        self._next_picture = 0.0

    def begin(self, job: str) -> None:
        with self._lock:
            self.job, self.losses, self.picture_step = job, [], None
            self._last_step_at, self._next_picture = None, 0.0

    def wants_picture(self) -> bool:
        """Time for a new picture? (Asked every step: a clock read.)"""
        return self.preview_path is not None and time.monotonic() >= self._next_picture

    def step(self, step: int, loss: tuple[int, float] | None, picture: Image.Image | None,
             elapsed: float | None = None) -> None:
        """`loss`: (the step it was taken at, the total), perhaps a few steps behind `step`;
        `elapsed`: the engine's seconds since its optimisation began, which times a job's first
        step (the steps after it are timed from the one before)."""
        now = time.monotonic()
        if picture is not None:
            self._publish(picture)
        with self._lock:
            if self._last_step_at is not None:
                self.steps.observe(now - self._last_step_at)
            elif elapsed is not None and elapsed >= 0:
                self.steps.observe(elapsed)
            self._last_step_at = now
            if loss is not None:
                self.losses.append(loss)
                if len(self.losses) > MAX_POINTS:
                    half = len(self.losses) // 2
                    self.losses = self.losses[:half:2] + self.losses[half:]
            if picture is not None:
                self.picture_step = step
                self._next_picture = now + PREVIEW_SECONDS

    def _publish(self, picture: Image.Image) -> None:
        buf = io.BytesIO()
        picture.convert("RGB").save(buf, "JPEG", quality=85)
        try:
            atomic_write_bytes(self.preview_path, buf.getvalue(), durable=False)  # type: ignore[arg-type]
        except OSError:
            pass  # a full disk must not stop the job for a preview

    def end(self) -> None:
        with self._lock:
            self.job, self.picture_step, self._last_step_at = None, None, None

    def job_done(self, seconds: float) -> None:
        with self._lock:
            self.jobs.observe(seconds)

    def as_json(self) -> dict:
        """status.json's `live`: the running job's picture step and losses, and the histograms."""
        with self._lock:
            return {"job": self.job, "picture_step": self.picture_step, "losses": [list(p) for p in self.losses],
                    "step_seconds": self.steps.as_json(), "job_seconds": self.jobs.as_json()}
