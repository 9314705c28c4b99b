"""Jitter: each step shows the network the picture shifted by a few pixels, one of a fixed cycle of
shifts, so that the pools meet every pixel at another phase from one step to the next.

Why: VGG's 2x2 pools of stride 2 lay a lattice over the picture (2 px at pool1, 16 px at pool4).
With average pooling the style loss's gradient through that fixed lattice grows a grid of small
squares in flat regions (docs/quality.md, "The pools' lattice: jitter"); shifted every step
through a fixed cycle of eight phases, none is favoured and the grid does not form. The picture
is reflected at its edges to keep its size, so a pass costs what it did (E512 unchanged). The
content loss compares like with like: its target is the content's features under the same shift,
one forward pass per shift at set-up.

Every tensor here stays where it was made and is changed in place (`at`), so a captured CUDA
graph replays each step under the shift of that step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from nstd.engine.losses import Target, wide

#: The cycle's (rows, columns) offsets into the picture padded by 8 px (8, 8: unshifted), drawn
#: once and fixed: eight different offsets, every parity of rows and columns (pool1's 2 px
#: lattice) twice, six of the 16 row phases and seven of the column phases of pool4's lattice.
CYCLE = ((8, 8), (9, 5), (8, 9), (14, 12), (1, 9), (7, 2), (4, 3), (9, 15))
#: shifts in a cycle: each step takes the next (its global step number modulo this)
SHIFTS = len(CYCLE)


def shifts(pad: int, seed: int = 0) -> list[tuple[int, int]]:
    """The cycle's offsets for a pad of `pad` px (scaled from CYCLE's 8), in an order fixed by
    `seed` (the job's; 0: CYCLE's own): every seed meets the same phases."""
    if pad <= 0:
        return [(0, 0)]
    order = list(range(SHIFTS)) if not seed else torch.randperm(SHIFTS, generator=torch.Generator().manual_seed(seed)).tolist()
    return [(round(CYCLE[i][0] * pad / 8), round(CYCLE[i][1] * pad / 8)) for i in order]


class Jitter:
    """The shifted view of a (1, 3, h, w) picture, and content targets under the same shifts."""

    def __init__(self, pad: int, hw: tuple[int, int], device: torch.device | str, seed: int = 0):
        h, w = hw
        self.pad = max(0, min(int(pad), h - 1, w - 1))  # reflection needs a pad under the size
        self.hw = (h, w)
        self.shifts = shifts(self.pad, seed)
        self._rows = torch.arange(h, device=device)
        self._cols = torch.arange(w, device=device)
        self.rows = self._rows.clone()
        self.cols = self._cols.clone()
        #: the current shift's index, as a one-element tensor (content targets select by it)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.at(0)

    def at(self, step: int) -> None:
        """Take the shift of global step `step`, in place."""
        i = step % len(self.shifts)
        dy, dx = self.shifts[i]
        self.rows.copy_(self._rows + dy)
        self.cols.copy_(self._cols + dx)
        self.index.fill_(i)

    def shifted(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """`t` (N, C, h, w) under shift `i`, whatever the current one."""
        if not self.pad:
            return t
        p, (dy, dx), (h, w) = self.pad, self.shifts[i], self.hw
        return F.pad(t, (p, p, p, p), mode="reflect")[..., dy:dy + h, dx:dx + w]

    def regions(self, objective):
        """`objective` with each masked region's weights shifted as the picture is; returned."""
        if self.pad:
            for r in objective.regions:
                if r.weights is not None:
                    r.weights = ShiftedWeights(r.weights, self)
        return objective

    def view(self, seen: torch.Tensor) -> torch.Tensor:
        """`seen` shifted by the current shift, reflected at its edges (same size)."""
        if not self.pad:
            return seen
        p = self.pad
        padded = F.pad(seen, (p, p, p, p), mode="reflect")
        return padded.index_select(-2, self.rows).index_select(-1, self.cols)

    def content_targets(self, content: torch.Tensor, layers, extract: Callable[[torch.Tensor], dict]) -> dict:
        """Each content layer's target under every shift (one forward pass a shift), selected
        by the current shift."""
        per_shift: dict[str, list[Target]] = {k: [] for k in layers}
        for i in range(len(self.shifts)):
            self.at(i)
            with torch.no_grad():
                feats = extract(self.view(content))
            for k in layers:
                per_shift[k].append(Target.of(feats[k]))
            del feats
        self.at(0)
        return {k: ShiftedTarget(torch.stack([t.value for t in ts]),
                                 torch.tensor([t.inv_scale for t in ts], device=ts[0].value.device),
                                 self.index)
                for k, ts in per_shift.items()}


def for_stage(p, hw: tuple[int, int], device, tiled: bool) -> Jitter:
    """The stage's jitter (StyleParams `p`: its pad and seed): none for a tiled pass, whose content
    targets are read in tiles."""
    return Jitter(0 if tiled else p.jitter, hw, device, p.seed)


class ShiftedWeights:
    """A masked region's weights (regions.Weights) under the current shift: the mask shifted as
    the picture is, each shift's weights made once per layer's grid, selected in place."""

    def __init__(self, weights, jitter: "Jitter"):
        self.each = [type(weights)(jitter.shifted(weights.full, i).contiguous()) for i in range(len(jitter.shifts))]
        self.index = jitter.index
        self._at: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, hw: tuple[int, int]) -> torch.Tensor:
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self._at:
            self._at[hw] = torch.cat([w.at(hw) for w in self.each])
            for w in self.each:  # kept once, in the concatenation
                w._at.pop(hw, None)
        return self._at[hw].index_select(0, self.index)


class ShiftedTarget:
    """A content target per shift; `loss` compares with the current shift's (as losses.Target)."""

    def __init__(self, values: torch.Tensor, inv_scales: torch.Tensor, index: torch.Tensor):
        self.values = values
        self.inv_scales = inv_scales
        self.index = index

    @property
    def value(self) -> torch.Tensor:
        return self.values.index_select(0, self.index)[0]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (wide(x) - self.value).pow(2).mean() * self.inv_scales.index_select(0, self.index)[0]
