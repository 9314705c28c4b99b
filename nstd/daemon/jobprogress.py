"""What a running job reports, from inside the engine's loop: the status and the worker's heartbeat
every step, the live picture and loss plot for the page, a log line every 5 %, checkpoints into
its state folder, and whether it must stop (a shutdown, a cancel, a lost lease, its time limit)."""
from __future__ import annotations

import time
from typing import Protocol

from loguru import logger

from nstd.daemon.queue import JobQueue
from nstd.engine import Checkpoint, Device, Progress, StepInfo
from nstd.state.checkpoints import Writer
from nstd.state.claim import Claim
from nstd.state.live import Live
from nstd.state.status import Status
from nstd.state.store import Store


class Runner(Protocol):
    """What a job's progress reads and writes of the worker running it (nstd/daemon/worker.py)."""

    cfg: dict
    heartbeat: float
    status: Status
    live: Live
    queue: JobQueue
    store: Store
    checkpoints: Writer  # takes a checkpoint off the worker's thread

    def should_stop(self) -> bool: ...

    def over_time(self) -> bool: ...

#: The status page's loss plot gets a point at least this often (one device sync each).
LOSS_SECONDS = 1.0

class JobProgress(Progress):
    """What a running job reports: status and heartbeat every step, a log line every 5 %,
    checkpoints into its state folder, and the worker's stop."""

    def __init__(self, worker: Runner, job: Claim, device: Device, steps: int):
        self.worker, self.job, self.device = worker, job, device
        self.steps = steps  # as planned; the engine's own count, from its first step, decides
        self.every = max(1, steps // 20)
        self.plot_every = max(1, steps // 100)  # about 100 points a job (or one a second)
        self.next_loss = 0.0
        self.loss_step = 0  # the step of the last loss plotted
        service = worker.cfg["service"]
        self.checkpoint_every = service["checkpoint_every"]
        self.checkpoint_seconds = service["checkpoint_seconds"]
        self.next_checkpoint = time.monotonic() + self.checkpoint_seconds if self.checkpoint_seconds else float("inf")
        self.log = logger.bind(job=job.name, job_id=job.id)

    def on_step(self, info: StepInfo) -> None:
        w = self.worker
        w.heartbeat = time.monotonic()
        if info.steps != self.steps:  # stages too small for the network are left out by the engine
            self.steps, self.every, self.plot_every = info.steps, max(1, info.steps // 20), max(1, info.steps // 100)
        eta = info.eta
        w.status.update(running={"name": self.job.name, "step": info.step, "steps": info.steps,
                                 "eta_seconds": round(eta, 1), "device": str(self.device)})
        last = info.step == info.steps
        now = time.monotonic()
        loss = None  # (step, total): on a GPU the newest already on the host, read without a sync
        if info.step % self.plot_every == 0 or last or now >= self.next_loss:
            got = info.recent_losses()
            if got is not None and got[0] != self.loss_step:
                loss, self.loss_step, self.next_loss = (got[0], got[1]["total"]), got[0], now + LOSS_SECONDS
        picture = info.picture() if info.picture is not None and w.live.wants_picture() else None
        w.live.step(info.step, loss, picture, info.elapsed)
        if info.step % self.every == 0 or last:
            got = info.recent_losses()
            self.log.info("step {}/{} loss {} eta {:.0f} s", info.step, info.steps,
                          "?" if got is None else f"{got[1]['total']:.4g}" + ("" if got[0] == info.step else
                                                                            f" (at step {got[0]})"), eta)

    def alive(self) -> None:
        self.worker.heartbeat = time.monotonic()

    def checkpoint_due(self, step: int) -> bool:
        """Every `service.checkpoint_seconds` (a 3 s job takes none), and every
        `service.checkpoint_every` steps if set."""
        now = time.monotonic()
        if now >= self.next_checkpoint:
            self.next_checkpoint = now + self.checkpoint_seconds
            return True
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        if not self.worker.queue.owns(self.job.id):
            return  # another worker holds the job now: its state folder is not ours to write
        self.worker.checkpoints.submit(self.worker.store.checkpoint_dir(self.job), checkpoint, self.log)

    def should_stop(self) -> bool:
        q, w = self.worker.queue, self.worker
        return w.should_stop() or q.is_cancelled(self.job.id) or q.lost(self.job.id) or w.over_time()
