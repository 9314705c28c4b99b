"""Regions: a style per region of the picture, and parts kept as the content (Gatys et al. 2017,
"Controlling Perceptual Factors in Neural Style Transfer": guided Gram matrices).

Each style may carry a mask (greyscale = weight, white = this style). The styles that share a
mask (all of them when none has one) form a region, matched by one target: their statistics
blended as without masks. A region's statistic of the picture is taken over its mask: each map
position weighted by the mask at that layer (the mask area-averaged to the layer's grid; on deep
maps eroded, so the positions next to an edge count less: ERODE_FROM), and
normalised by the mask's mass, so it is comparable with the style's statistic of the whole style
image (losses.py, styleloss.py: a weighted Gram matrix, weighted moments, a weighted sort). Each
region's loss counts by its share of the picture (the mask's mean), so a pixel feels the style as
strongly as in an unmasked run, and a mask of all white is no mask. Where masks overlap (a style
without a mask beside masked ones, too), a pixel's style is shared among them, each mask over
their sum; a pixel they cover only in part (a grey mask alone) is painted in full and that part
of it blended back to the content at the end, as a grey keep is.

What stays the content (the `keep` mask, and wherever no style's mask reaches: 1 - the masks'
sum) is kept two ways at once (color.Palette). A pixel kept whole (keep 1) is the content's in
the picture the network sees, so no gradient reaches it, no region's statistic counts it, and
the optimiser paints its neighbours knowing it is there. A grey keep is a blend at the end: the
picture is painted there as elsewhere and what is shown (the result, the GIF) is the painted
picture and the content mixed by the grey, so grey = weight. (Blending grey pixels in what the
network sees instead would not work: the optimiser pushes the painted pixel further to make up
for the mix, and a keep of 50 % grey ends 86 % as far from the content as no keep.)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from nstd.engine.options import mask_ratio_problem
from nstd.engine.targets import StyleImage

#: A region whose mask covers less than this share of the picture is left out (its statistic
#: would be a division by almost nothing).
MIN_SHARE = 1e-4
#: A pixel whose styles' weights add up to less than this counts as having no style (report).
NO_STYLE = 0.01
#: A pixel kept at least this much (within half an 8-bit level of white) is kept whole.
HELD = 1 - 0.5 / 255
#: On maps this many times smaller than the picture or more (conv3_1 and deeper), a position's
#: weight is the least of its neighbourhood, erode_radius cells each way. A deep position sees well
#: beyond its cell; the ones next to the other region, seeing it across the edge and matched to
#: this region's style all the same, made the edge busier than either side (bench/quality.py
#: --regions: golden_gate's seam 1.04 and 1.10 on two seeds at 256 px, 0.90 and 0.91 eroded; at
#: 512 px 1.44 plain, 1.16 by one cell, 0.95 by two). It calms the edge, it does not fence it.
#: Every edge of a region's weights is eroded (around a kept hole too); the picture's border is
#: not. A region that erosion would leave with less than ERODE_KEEPS of its weight on a map (a thin
#: one, a small picture) keeps its means there: its statistic would stand on a few positions.
ERODE_FROM = 4
ERODE_KEEPS = 0.5
#: The erosion's radius in map cells: one per this many pixels of the picture's long edge (at
#: least one). A mask is drawn for the whole picture and resized to it, so its soft edge is a
#: share of the picture; a fixed cell would be half as much of it at 512 px as at 256.
ERODE_PER = 256


def check_ratio(content_size: tuple[int, int], mask: Image.Image, name: str) -> None:
    """ValueError naming the mask `name` when its aspect ratio is not the content's (within 1 %)."""
    why = mask_ratio_problem(name, None, mask.size, content_size)
    if why:
        raise ValueError(why)


def mask_tensor(mask: Image.Image, size: tuple[int, int], place: torch.device) -> torch.Tensor:
    """(1, 1, h, w) weights in 0..1 of `mask` (its grey: the readers have already painted any
    transparency over white) resized to `size` (w, h)."""
    grey = mask.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    t = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(1, 1, size[1], size[0])
    return (t.float() / 255.0).to(place)


def _key(mask: Image.Image | None) -> tuple | None:
    if mask is None:
        return None
    return (mask.size, mask.mode, hashlib.sha1(mask.tobytes()).hexdigest())


def erode_radius(hw: tuple[int, int]) -> int:
    """The deep maps' erosion radius in cells for a picture of h x w (ERODE_PER)."""
    return max(1, round(max(hw) / ERODE_PER))


class Weights:
    """A region's weights at the picture's size, area-averaged to each layer's grid on demand
    (and on deep maps eroded: ERODE_FROM)."""

    def __init__(self, full: torch.Tensor):
        self.full = full  # (1, 1, H, W)
        self._at: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, hw: tuple[int, int]) -> torch.Tensor:
        """(1, 1, h, w) weights on a map of h x w (the whole map: a tile slices it). A map the
        network pooled d times from the picture (h = H // d) covers its first h * d rows and
        columns, so the weights are those pixels' means, d x d each; from ERODE_FROM on, eroded."""
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self._at:
            (big_h, big_w), (h, w) = self.full.shape[-2:], hw
            d = 2 ** int(math.log2(big_h / h)) if h <= big_h else 0
            if (big_h, big_w) == hw:
                at = self.full
            elif d and big_h // d == h and big_w // d == w:
                at = F.avg_pool2d(self.full[..., :h * d, :w * d], d)
            else:
                at = F.adaptive_avg_pool2d(self.full, hw)
            if d >= ERODE_FROM:
                r = erode_radius((big_h, big_w))
                eroded = -F.max_pool2d(-at, 2 * r + 1, stride=1, padding=r)  # the least around (the border: of what is there)
                if float(eroded.sum()) >= ERODE_KEEPS * float(at.sum()):
                    at = eroded
            self._at[hw] = at
        return self._at[hw]

    def scaled(self, hw: tuple[int, int]) -> "Weights":
        """The same weights for a picture of h x w (the anchor's pass)."""
        return Weights(F.interpolate(self.full, size=hw, mode="area") if tuple(self.full.shape[-2:]) != hw
                       else self.full)


@dataclass
class Region:
    """Styles matched together (indices into the run's styles), where (`weights`, None: the whole
    picture), counting `share` of the style term."""

    styles: list[int]
    weights: Weights | None
    share: float


@dataclass
class Layout:
    """One stage's regions and what it keeps, at the stage's picture size."""

    regions: list[Region]
    keep: torch.Tensor | None  # (1, 1, h, w): 1 = the content, 0 = painted, grey: blended; None: nothing kept
    report: dict | None
    held: torch.Tensor | None = None  # (1, 1, h, w): 1 where kept whole, else 0; None: nowhere

    @property
    def plain(self) -> bool:
        """No masks: one region, everywhere (the run is exactly the unmasked one)."""
        return self.keep is None and len(self.regions) == 1 and self.regions[0].weights is None

    def for_anchor(self, hw: tuple[int, int]) -> list[Region]:
        """The regions with their weights at the anchor's size."""
        return [Region(r.styles, r.weights.scaled(hw) if r.weights is not None else None, r.share)
                for r in self.regions]


def count(styles: Sequence[StyleImage], keep: Image.Image | None) -> int:
    """How many masked regions a run of `styles` and `keep` has (the memory model's count): 0
    without masks, else one per distinct mask (the styles without one share a region)."""
    if keep is None and all(s.mask is None for s in styles):
        return 0
    return len({_key(s.mask) for s in styles if s.weight > 0})


def layout(styles: Sequence[StyleImage], keep: Image.Image | None, content_size: tuple[int, int],
           size: tuple[int, int], place: torch.device) -> Layout:
    """The regions of `styles` (grouped by mask) and the kept part, at `size` (w, h) on `place`.
    A mask whose aspect ratio is not the content's is refused (ValueError naming it)."""
    for i, s in enumerate(styles):
        if s.mask is not None:
            check_ratio(content_size, s.mask, f"style[{i}].mask")
    if keep is not None:
        check_ratio(content_size, keep, "keep")
    if keep is None and all(s.mask is None for s in styles):
        return Layout([Region(list(range(len(styles))), None, 1.0)], None, None)
    groups: dict[tuple | None, list[int]] = {}
    for i, s in enumerate(styles):
        if s.weight > 0:  # a style of weight 0 paints nowhere: its mask covers nothing
            groups.setdefault(_key(s.mask), []).append(i)
    if not groups:
        raise ValueError("style blend weights must be >= 0 and not all 0")
    kept = mask_tensor(keep, size, place) if keep is not None else None
    w, h = size
    ones = torch.ones((1, 1, h, w), device=place)
    masks = [mask_tensor(styles[idx[0]].mask, size, place) if k is not None else ones for k, idx in groups.items()]
    total = torch.stack(masks).sum(0)
    covered = total.clamp(max=1.0)
    keep_all = 1 - (covered if kept is None else covered * (1 - kept))  # kept, and what no mask covers
    held = (keep_all >= HELD).to(keep_all.dtype)
    regions, shown = [], []
    for (k, idx), m in zip(groups.items(), masks):
        # A painted pixel takes its whole style, shared by the masks that reach it (overlaps split
        # it, a grey mask alone does not weaken it: what no mask covers is blended at the end).
        part = m / total.clamp(min=1e-6)
        weights = part * (1 - held)
        share = float(weights.mean())
        if share >= MIN_SHARE:
            everywhere = k is None and len(groups) == 1 and not bool(held.any())
            regions.append(Region(idx, None if everywhere else Weights(weights), share))
        shown.append(float((part * (1 - keep_all)).mean()) if share >= MIN_SHARE else 0.0)  # after the blend
    report = {
        "styles": [round(next((sh for sh, idx in zip(shown, groups.values()) if i in idx), 0.0), 4)
                   for i in range(len(styles))],
        "keep": round(float(kept.mean()), 4) if kept is not None else 0.0,
        "no_style": round(float(((covered < NO_STYLE) & (kept is None or kept < 0.5)).float().mean()), 4),
    }
    return Layout(regions, keep_all if float(keep_all.max()) > 0 else None, report,
                  held if bool(held.any()) else None)
