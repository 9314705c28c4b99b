"""The VGG pass over overlapping tiles: a picture of any size in the memory of one tile.

Why: at 4096 x 3072 one conv1_1 map alone is 3.2 GB in fp32, so no budget of a few GiB holds an
untiled pass. The losses are sums over map positions (a Gram matrix is sum_p f_p f_p^T, W2's
moments sums of f and f f^T, the content loss a sum of squares), so a pass can be split into tiles
exactly (the sliced loss's sort is not: styleloss.py; it is refused here):

- each tile is a core (the positions it answers for; the cores partition the picture) plus a halo
  at least `Extractor.reach` wide, so that no zero padding at the tile's edge reaches a core
  feature; tiles start on the deepest map's grid (16 px for conv5_x), so every pooling window
  falls where it falls in the whole picture;
- pass 1, without autograd: the loss kind's statistics (Gram matrices; W2's mean and second
  moment), summed over the tiles' cores;
- the style loss and its gradient with respect to each statistic, dL/dS, from those;
- pass 2, per tile: features with autograd, the surrogate sum(dL/dS * S_tile) plus the tile's
  content loss, backward; the tile's input gradient (halo included) is added into the picture's.

The result equals the untiled pass's loss and gradient up to rounding (a test checks 1e-4). It
costs one more forward pass per step (pass 1) plus the halos' share.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from nstd.engine.losses import GRAM, StyleRegion
from nstd.engine.styleloss import StyleLossError
from nstd.engine.vgg import CONV_SHAPES, Extractor


@dataclass(frozen=True)
class Tile:
    """Rows and columns (input px, end exclusive) of a core and of the window read for it."""

    core: tuple[int, int, int, int]  # y0, y1, x0, x1
    window: tuple[int, int, int, int]


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _spans(length: int, core: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    for c0 in range(0, length, core):
        c1 = min(length, c0 + core)
        yield c0, c1, max(0, c0 - halo), min(length, c1 + halo)


def layout(height: int, width: int, tile: int, halo: int) -> list[Tile]:
    """Tiles whose cores (`tile` px square, cut at the picture's edge) cover the picture once."""
    return [Tile((y0, y1, x0, x1), (wy0, wy1, wx0, wx1))
            for y0, y1, wy0, wy1 in _spans(height, tile, halo) for x0, x1, wx0, wx1 in _spans(width, tile, halo)]


def halo_for(extractor: Extractor) -> int:
    """The halo for `extractor`: its reach, on the deepest map's grid."""
    return _round_up(extractor.reach, extractor.downsampling)


class Tiler:
    """Tiled passes of one extractor with `tile` px cores (rounded up to its grid)."""

    def __init__(self, extractor: Extractor, tile: int, checkpoint: bool = False,
                 autocast: Callable[[], AbstractContextManager] | None = None, tick: Callable[[], None] | None = None):
        """`tick` is called before each tile (a heartbeat; it may raise to stop the pass)."""
        self.ext = extractor
        self.grid = extractor.downsampling
        self.tile = _round_up(max(tile, self.grid), self.grid)
        self.halo = halo_for(extractor)
        self.checkpoint = checkpoint
        self.autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
        self.tick = tick or (lambda: None)

    def tiles(self, height: int, width: int) -> list[Tile]:
        return layout(height, width, self.tile, self.halo)

    def _core(self, layer: str, feats: torch.Tensor, t: Tile, size: tuple[int, int]) -> torch.Tensor:
        """The part of a window's map for `layer` that its core answers for."""
        d = self.ext.scale_of(layer)
        (y0, y1, x0, x1), (wy0, _, wx0, _) = t.core, t.window
        rows = slice((y0 - wy0) // d, (y1 - wy0) // d if y1 < size[0] else None)
        cols = slice((x0 - wx0) // d, (x1 - wx0) // d if x1 < size[1] else None)
        return feats[..., rows, cols]

    def _window(self, image: torch.Tensor, t: Tile) -> torch.Tensor:
        wy0, wy1, wx0, wx1 = t.window
        return image[..., wy0:wy1, wx0:wx1]

    def _cores(self, image: torch.Tensor, layers: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, tuple[int, int]]]:
        """(layer, a tile's core map, where that core starts in the whole map) for every tile,
        without autograd."""
        size = tuple(image.shape[-2:])
        for t in self.tiles(*size):
            self.tick()
            with torch.no_grad(), self.autocast():
                feats = self.ext(self._window(image, t))
            for layer in layers:
                yield layer, self._core(layer, feats[layer], t, size), self._origin(layer, t)

    def _origin(self, layer: str, t: Tile) -> tuple[int, int]:
        d = self.ext.scale_of(layer)
        return t.core[0] // d, t.core[2] // d

    @torch.no_grad()
    def features(self, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Whole maps of `layers` (the content targets), assembled from the tiles' cores."""
        size = tuple(image.shape[-2:])
        out: dict[str, torch.Tensor] = {}
        for layer, core, (y, x) in self._cores(image, layers):
            if layer not in out:
                d = self.ext.scale_of(layer)
                out[layer] = core.new_zeros((*core.shape[:2], size[0] // d, size[1] // d))
            out[layer][..., y:y + core.shape[-2], x:x + core.shape[-1]] = core
        return out

    @torch.no_grad()
    def grams(self, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Gram matrices of whole maps (normalised by the whole map's C*H*W), summed over cores."""
        return self.stats(image, layers, GRAM)

    @torch.no_grad()
    def stats(self, image: torch.Tensor, layers: Sequence[str], kind=GRAM) -> dict:
        """The loss kind's statistics of whole maps: a summable kind's parts summed over the cores
        and divided by the whole map's count; the sliced kind's projections gathered over the
        cores, then sorted (exact: what is not exact over tiles is the gradient of the sort)."""
        if not kind.summable:
            out: dict[str, list] = {}
            for layer, core, _ in self._cores(image, layers):
                out.setdefault(layer, []).append(kind.parts(layer, core)[0])
            return {layer: kind.pack((torch.cat(out[layer], dim=-1),)) for layer in layers}
        return self.region_stats(image, [StyleRegion(dict.fromkeys(layers))], kind)[0]

    @torch.no_grad()
    def region_stats(self, image: torch.Tensor, regions: Sequence[StyleRegion], kind=GRAM) -> list[dict]:
        """Each region's statistics of its layers over whole maps (losses.StyleRegion: its
        weights sliced to each core), its parts summed over the cores: one pass for all."""
        if not kind.summable:
            raise StyleLossError(f"style_loss {kind.name}: a region's statistic cannot be summed over tiles")
        size = tuple(image.shape[-2:])
        layers = list(dict.fromkeys(k for r in regions for k in r.targets))
        sums: list[dict[str, list]] = [{} for _ in regions]
        for layer, core, origin in self._cores(image, layers):
            for r, acc in zip(regions, sums):
                if layer not in r.targets:
                    continue
                parts = kind.parts(layer, core, self._weight(r, layer, size, core, origin))
                if layer not in acc:
                    acc[layer] = list(parts)
                else:
                    for a, p in zip(acc[layer], parts):
                        a.add_(p)
        return [{layer: kind.pack(tuple(a.div_(self._norm(layer, size, kind, r)) for a in acc[layer]))
                 for layer in r.targets} for r, acc in zip(regions, sums)]

    def _weight(self, region: StyleRegion, layer: str, size: tuple[int, int], core: torch.Tensor,
                origin: tuple[int, int]) -> torch.Tensor | None:
        """The region's weights over a core of `layer` (sliced from the whole map's)."""
        d = self.ext.scale_of(layer)
        whole = region.weight((size[0] // d, size[1] // d))
        if whole is None:
            return None
        y, x = origin
        return whole[..., y:y + core.shape[-2], x:x + core.shape[-1]]

    def _norm(self, layer: str, size: tuple[int, int], kind=GRAM, region: StyleRegion | None = None):
        d = self.ext.scale_of(layer)
        hw = (size[0] // d, size[1] // d)
        weight = region.weight(hw) if region is not None else None
        n = hw[0] * hw[1] if weight is None else weight.sum()
        return kind.count(CONV_SHAPES[layer][0], n)

    def loss_and_grad(self, seen: torch.Tensor, objective) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted content loss, weighted style loss, d(content + style)/d seen) at `seen`,
        exactly as the untiled pass gives them (`objective` is losses.Objective)."""
        kind = objective.kind
        if not kind.summable:
            raise StyleLossError(f"style_loss: {kind.name} cannot run in tiles: its statistic is not a sum over "
                                 "positions (style_loss gram or w2 can)")
        seen = seen.detach()
        size = tuple(seen.shape[-2:])
        regions = objective.regions
        parts = [{k: tuple(t.requires_grad_(True) for t in kind.unpack(s)) for k, s in got.items()}
                 for got in self.region_stats(seen, regions, kind)]
        with torch.enable_grad():
            style = objective.style_term([{k: kind.pack(v) for k, v in got.items()} for got in parts], seen)
            leaves = [t for got in parts for v in got.values() for t in v]
            grads = iter(torch.autograd.grad(style, leaves) if leaves and style.requires_grad else ())
            d_stats = [{k: tuple(next(grads) for _ in v) for k, v in got.items()} for got in parts] if leaves and \
                style.requires_grad else [{} for _ in parts]
        grad = torch.zeros_like(seen)
        content = seen.new_zeros(())
        for t in self.tiles(*size):
            self.tick()
            window = self._window(seen, t).clone().requires_grad_(True)
            with torch.enable_grad():
                with self.autocast():
                    feats = self.ext(window, checkpoint=self.checkpoint)
                surrogate = seen.new_zeros(())
                for r, d_region in zip(regions, d_stats):
                    for layer, ds in d_region.items():
                        core = self._core(layer, feats[layer], t, size)
                        weight = self._weight(r, layer, size, core, self._origin(layer, t))
                        norm = self._norm(layer, size, kind, r)
                        for d, part in zip(ds, kind.parts(layer, core, weight)):
                            surrogate = surrogate + (d * part).sum() / norm
                part = seen.new_zeros(())
                for layer, target in objective.content.items():
                    core = self._core(layer, feats[layer], t, size)
                    y, x = self._origin(layer, t)
                    goal = target.value[..., y:y + core.shape[-2], x:x + core.shape[-1]]
                    part = part + (core.float() - goal).pow(2).sum() * (target.inv_scale / target.value.numel())
                part = part * objective.content_scale
                if surrogate.requires_grad or part.requires_grad:
                    (surrogate + part).backward()
            wy0, wy1, wx0, wx1 = t.window
            if window.grad is not None:
                grad[..., wy0:wy1, wx0:wx1] += window.grad
            content = content + part.detach()
        return content, style.detach(), grad

