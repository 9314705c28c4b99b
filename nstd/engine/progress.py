"""How a run talks to its caller: after each step, at checkpoints, and when asked to stop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

from nstd.engine.losses import Losses


@dataclass
class StepInfo:
    """Passed to the progress callback after every step. `losses()` is this step's, and costs a
    device sync (the GPU's queue drains); `recent_losses()` costs nothing."""

    step: int
    steps: int
    elapsed: float
    raw_losses: Losses
    #: the picture as it is now (frame-sized), made only when called: a device-to-host copy
    picture: Optional[Callable[[], Image.Image]] = None
    #: seconds left, from the pace so far with each stage's steps weighed by its pixels
    eta: float = 0.0
    #: the run's network passes so far, this step's included, in E512 (docs/jobs.md)
    e512: float = 0.0

    #: the newest losses already copied to the host, and their step (set by the engine on CUDA)
    landed: Optional[Callable[[], Optional[tuple[int, dict[str, float]]]]] = None

    def losses(self) -> dict[str, float]:
        return self.raw_losses.as_floats()

    def recent_losses(self) -> Optional[tuple[int, dict[str, float]]]:
        """(step, losses) without waiting for the device: on CUDA the newest that has landed on
        the host (a few steps behind; None before the first has), elsewhere this step's. The
        run's last step gives its own (one sync, at the end, when the picture is read anyway)."""
        if self.landed is None or self.step == self.steps:
            return self.step, self.losses()
        return self.landed()


@dataclass
class Checkpoint:
    """Where a run is after `step` steps: enough to resume it (the L-BFGS history is not kept)."""

    step: int
    #: (1, 3, H, W) float32 on the CPU; (1, 1, H, W), the luma, in luminance mode; None when the
    #: run stopped before it had a picture (in the first stage's target passes): nothing to resume
    image: torch.Tensor | None
    frames: list[Image.Image]
    #: the GIF's frames are every this many chances (the engine thins them to stay bounded)
    frame_stride: int = 1


class Interrupted(Exception):
    """The run stopped at a step boundary because `should_stop()` said so; resume from `checkpoint`."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        super().__init__(f"stopped after step {checkpoint.step}")


class Progress:
    """The one callback object a run reports to; override what you need.

    `on_step` after every step; `alive` within long steps and between stages (each tile of a
    tiled pass, each stage's targets: a step at 4096 px on a CPU takes minutes, and a watchdog
    must not take that for a hang); `on_checkpoint` with a resumable checkpoint after each step for
    which `checkpoint_due` says so (by default every `checkpoint_every` steps, 0: never; a
    checkpoint copies the picture to the host, so it is asked for sparingly); `should_stop` is
    asked after every step, and True ends the run with `Interrupted`.
    """

    checkpoint_every: int = 0

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0

    def on_step(self, info: StepInfo) -> None:
        pass

    def alive(self) -> None:
        pass

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class OnStep(Progress):
    """A Progress from a plain per-step function."""

    def __init__(self, fn: Callable[[StepInfo], None]):
        self.on_step = fn  # type: ignore[method-assign]
