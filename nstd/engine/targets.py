"""Style targets: which size a style image is seen at, and a cache of its Gram matrices.

The engine owns both rules so that nobody else repeats them: a style image is resized so its long
edge is the result's long edge times `style_scale`, and its Gram targets are reused when the same
file content is seen again at the same edge, layers, pooling, device and colour adjustment (a
batch in one style pays once).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

Grams = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StyleImage:
    """One style of a blend. `digest` (the file's sha256) makes its targets cacheable. `mask`: where
    in the picture this style goes (greyscale = weight, white = this style; regions.py); None:
    everywhere."""

    image: Image.Image
    weight: float = 1.0
    digest: str | None = None
    mask: Image.Image | None = None


class TargetCache:
    """Gram targets keyed by (digest, edge, layers, pooling, device) plus the colour mode's part
    (engine/color.py Palette.key); least recently used goes."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict[tuple, Grams] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(digest: str, edge: int, layers: tuple[str, ...], pooling: str, device: str) -> tuple:
        return (digest, edge, tuple(layers), pooling, device)

    def get(self, key: tuple, compute: Callable[[], Grams]) -> Grams:
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

    def counts(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def clear(self) -> None:
        """Drop every target (after an out-of-memory error: they hold device memory)."""
        self._items.clear()
