"""The divergence guard: L-BFGS without a line search can overshoot wildly on a bad curvature
estimate, so every evaluation is watched and a diverging one sends the picture back to the best."""
from __future__ import annotations

from typing import Callable

import torch

from nstd.engine.losses import Losses


class Guard:
    """Remembers the best evaluated picture and notices a diverging step (loss > 2 x best, or not
    finite), all on the device: nothing here waits for the GPU."""

    def __init__(self, x: torch.Tensor):
        self.best_x = x.detach().clone()
        self.best_values = torch.full((4,), float("inf"), device=x.device)  # content, style, tv, total
        self.last: Losses | None = None
        self.diverged = torch.zeros((), dtype=torch.bool, device=x.device)
        self.restarts = torch.zeros((), dtype=torch.long, device=x.device)
        #: evaluations seen, counted on the device: a replayed graph must add one (graph.StepGraphs.capture)
        self.evaluations = torch.zeros((), dtype=torch.long, device=x.device)

    @property
    def best_total(self) -> torch.Tensor:
        return self.best_values[3]

    @property
    def best(self) -> Losses:
        return Losses(*self.best_values.unbind())

    def saw(self, losses: Losses, x: torch.Tensor) -> None:
        """In place throughout: a CUDA graph replays into the tensors it captured."""
        self.last = losses
        self.evaluations.add_(1)
        values = torch.stack([losses.content, losses.style, losses.tv, losses.total]).float()
        total, best = values[3], self.best_total
        improved = total < best
        self.diverged.copy_(~improved & (~torch.isfinite(total) | (total > 2 * best)))
        self.best_values.copy_(torch.where(improved, values, self.best_values))
        self.best_x.copy_(torch.where(improved, x.detach(), self.best_x))

    def restore_if_diverged(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the best picture where the last evaluation diverged; returns the mask."""
        diverged = self.diverged.clone()
        with torch.no_grad():
            x.copy_(torch.where(diverged, self.best_x, x))
        self.restarts.add_(diverged.long())
        self.diverged.fill_(False)
        return diverged

    def settle(self, x: torch.Tensor, last: Losses, judge: Callable[[torch.Tensor], Losses] | None = None) -> Losses:
        """The stage's end: `x` (losses `last`) stays if no worse than the best picture, else goes
        back to it; the losses of what stays. `judge`: the best picture's losses measured again as
        the last one's were (a jittered stage's steps each saw another shift); None: as recorded."""
        if float(last.total) <= float(self.best_total):
            return last
        best = judge(self.best_x) if judge is not None else self.best
        if float(last.total) <= float(best.total):
            return last
        self.restore(x)
        return best

    def restore(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x.copy_(self.best_x)
