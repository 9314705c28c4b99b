"""The style anchor: a big stage also matches the style at the anchor size, so its strokes keep
the size they have there instead of being repainted at the stage's own scale."""
from __future__ import annotations

from typing import Callable, ContextManager

import torch

from nstd.engine import schedule
from nstd.engine.losses import Objective
from nstd.engine.params import StyleParams


def anchor_hw(content_size: tuple[int, int], p: StyleParams, size: int | None = None) -> tuple[int, int] | None:
    """(h, w) of the anchor's pass for a stage of long edge `size` (default the result's)."""
    return schedule.anchor_hw(content_size, p.anchor_size, size or p.size)


class Anchor:
    """The style term of the picture scaled down to the anchor size (antialiased), against the
    style seen at that size, by the stage's style loss kind (its objective's): added to a big
    stage's loss, it keeps the strokes the size they have
    at the anchor, relative to the picture, while the stage's own term adds the detail its pixels
    allow. Without it, the last stages of a 2048 px run repaint the strokes at their own scale
    (measured: the style loss at 512 px of the 2048 px result rose to 3.3x the 512 px run's)."""

    def __init__(self, size: tuple[int, int], extractor: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                 objective: Objective, autocast: Callable[[bool], ContextManager]):
        self.size, self.extractor, self.objective, self.autocast = size, extractor, objective, autocast

    def __call__(self, seen: torch.Tensor, capturing: bool = False) -> torch.Tensor:
        small = torch.nn.functional.interpolate(seen, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        with self.autocast(capturing):
            feats = self.extractor(small)
        return self.objective.style_term(self.objective.style_stats(feats))
