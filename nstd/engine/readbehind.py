"""What a run reads back from the device without stopping it: the GIF's frames and the losses
progress shows, each copied to the host behind the steps queued so far (on CUDA; elsewhere at once).
Also the frames' bounds: they are all held until the run ends."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import Palette
from nstd.engine.losses import Losses

#: A GIF frame's long edge at most, whatever a job asks: frames are held until the end.
FRAME_EDGE_MAX = 1024
#: What a run's frames may take in memory (and in a checkpoint), and how many there may be: past
#: either, every other frame goes and frames are taken half as often (the GIF keeps its pace).
FRAME_BYTES_MAX = 128 * 2**20
FRAMES_MAX = 300
FRAMES_MIN = 16


def _frame_size(final: tuple[int, int], max_size: int) -> tuple[int, int]:
    """The GIF's frame size: the result's, scaled down to `max_size` (never up) and to FRAME_EDGE_MAX."""
    max_size = min(max_size, FRAME_EDGE_MAX)
    return images.fit_long_edge(final, max_size) if max(final) > max_size else final


def frames_max(size: tuple[int, int]) -> int:
    """How many frames of `size` a run holds at most (FRAME_BYTES_MAX, within FRAMES_MIN..FRAMES_MAX)."""
    return max(FRAMES_MIN, min(FRAMES_MAX, FRAME_BYTES_MAX // max(1, size[0] * size[1] * 3)))


def frame_of(x: torch.Tensor, size: tuple[int, int], palette: Palette | None, shown: bool = False) -> Image.Image:
    """A GIF frame of the picture `x` (already in display form when `shown`) at `size`: every
    stage's frames at the final stage's frame size. Read at once (a device sync)."""
    img = images.to_pil(x.detach() if shown else palette.show(x.detach()))
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def pinned_like(t: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory shaped like `t`: a copy into it can run behind the GPU's queue."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


class Frames:
    """The GIF's frames, read without stopping the GPU. On CUDA each frame is made 8-bit at the
    frame size on the device, copied into pinned host memory behind the steps queued so far, with
    an event on that device's stream, and made into a picture once that copy has landed (at a
    later frame, or when all are asked for): the GPU never waits for the host, and what waits in
    host memory is the frame, not the float picture. Elsewhere a frame is made at once. `convert`
    makes a picture of a tensor in display form; `size` is the frame size (width, height)."""

    def __init__(self, convert: Callable[[torch.Tensor], Image.Image], done: list[Image.Image], asynchronous: bool,
                 size: tuple[int, int] = (0, 0), stride: int = 1):
        self.convert, self.done, self.asynchronous, self.size = convert, done, asynchronous, size
        self.pending: list[tuple[torch.Tensor, "torch.cuda.Event"]] = []
        #: a frame is taken at every `stride`-th chance (doubled each time the frames are thinned)
        self.stride = stride
        self.limit = frames_max(size)

    def __len__(self) -> int:
        return len(self.done) + len(self.pending)

    def wants(self, chance: int, last: bool = False) -> bool:
        """Whether the `chance`-th frame (step // gif.every) is taken; the last step's always is."""
        return last or chance % self.stride == 0

    def add(self, shown: torch.Tensor) -> None:
        self._add(shown)
        if len(self) > self.limit:  # every other frame goes; from now on, half as many are taken
            self._collect(wait=True)
            self.done[:] = self.done[::2]
            self.stride *= 2

    def _add(self, shown: torch.Tensor) -> None:
        if not self.asynchronous:
            self.done.append(self.convert(shown))
            return
        w, h = self.size
        if shown.shape[-1] > w or shown.shape[-2] > h:  # a big picture: its frame is made smaller there
            shown = torch.nn.functional.interpolate(shown, size=(h, w), mode="bicubic", antialias=True,
                                                    align_corners=False)
        frame = images.to_uint8_hwc(shown)
        host = pinned_like(frame)
        host.copy_(frame, non_blocking=True)  # stream-ordered: `frame`'s memory is not reused before
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(frame.device))  # the copy's device, not the current one
        self.pending.append((host, landed))
        self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0][1].query()):
            host, landed = self.pending.pop(0)
            landed.synchronize()
            img = images.from_uint8_hwc(host)
            self.done.append(img if img.size == self.size else img.resize(self.size, Image.Resampling.LANCZOS))

    def all(self) -> list[Image.Image]:
        """Every frame so far, in order (waits for the copies still under way)."""
        self._collect(wait=True)
        return list(self.done)


class LossTap:
    """Each step's losses copied to the host behind the GPU's queue (a ring of pinned buffers,
    each with an event), so progress can show a loss without stopping the GPU. A slot is read
    only while its newest copy has landed and none newer was queued into it."""

    SLOTS = 8

    def __init__(self) -> None:
        self.slots: list[list] = []  # [step, pinned (4,) float32, event]
        self.next = 0

    def add(self, step: int, losses: Losses) -> None:
        values = torch.stack([losses.content, losses.style, losses.tv, losses.total]).detach().float()
        if len(self.slots) < self.SLOTS:
            self.slots.append([step, pinned_like(values), torch.cuda.Event()])
            slot = self.slots[-1]
        else:
            slot = self.slots[self.next]
            self.next = (self.next + 1) % self.SLOTS
            slot[0] = step
        slot[1].copy_(values, non_blocking=True)
        slot[2].record(torch.cuda.current_stream(values.device))

    def landed(self) -> tuple[int, dict[str, float]] | None:
        done = [s for s in self.slots if s[2].query()]
        if not done:
            return None
        step, host, _ = max(done, key=lambda s: s[0])
        return step, dict(zip(("content", "style", "tv", "total"), host.tolist()))
