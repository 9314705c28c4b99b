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


#: What the cache keeps at most: its targets sit on the device beside the job's own, outside the
#: memory model (a Gram entry takes 2.4 MiB; a sliced one up to 190, and is then not kept).
CACHE_BYTES = 64 * 2**20


def _nbytes(value) -> int:
    """The bytes of the tensors in a target dict (tensors, or tuples of them), each storage once."""
    seen: dict[int, int] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
    return sum(seen.values())


class TargetCache:
    """Style targets keyed by (digest, edge, layers, pooling, device) plus the colour mode's part
    (engine/color.py Palette.key) and the loss kind's; least recently used goes, past `capacity`
    entries or `max_bytes` in all (an entry larger than that is not kept)."""

    def __init__(self, capacity: int = 32, max_bytes: int = CACHE_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Grams] = OrderedDict()
        self._bytes: dict[tuple, int] = {}
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
        size = _nbytes(value)
        if size > self.max_bytes:
            return value
        self._items[key], self._bytes[key] = value, size
        while len(self._items) > self.capacity or sum(self._bytes.values()) > self.max_bytes:
            old, _ = self._items.popitem(last=False)
            del self._bytes[old]
        return value

    @property
    def nbytes(self) -> int:
        """The bytes its targets hold."""
        return sum(self._bytes.values())

    def counts(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def clear(self) -> None:
        """Drop every target (after an out-of-memory error: they hold device memory)."""
        self._items.clear()
        self._bytes.clear()
