"""Adam, the optimiser a job may ask for instead of L-BFGS (`optimizer: adam`)."""
from __future__ import annotations

import torch

#: The step size, in 0..1 pixel units.
ADAM_LR = 0.02


class Adam:
    """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8), kept here so that no torch.optim
    optimiser is built: its first step imports torch._dynamo, over a second of start-up."""

    def __init__(self, x: torch.Tensor, lr: float = ADAM_LR, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.x, self.lr, self.betas, self.eps = x, lr, betas, eps
        self.avg = torch.zeros_like(x)
        self.avg_sq = torch.zeros_like(x)
        self.n = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.n += 1
        self.avg.lerp_(grad, 1 - b1)
        self.avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.avg_sq.sqrt() / (1 - b2 ** self.n) ** 0.5).add_(self.eps)
        self.x.addcdiv_(self.avg, denom, value=-self.lr / (1 - b1 ** self.n))
