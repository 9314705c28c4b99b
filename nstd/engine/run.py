"""What the stages of one run share, and the Result they leave."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import Palette
from nstd.engine.device import Device
from nstd.engine.losses import Losses
from nstd.engine.memory import Techniques
from nstd.engine.params import Result, StyleParams
from nstd.engine.progress import Progress
from nstd.engine.readbehind import Frames, LossTap, frame_of
from nstd.engine.schedule import Stage
from nstd.engine.targets import StyleImage, TargetCache


@dataclass
class Run:
    """What the stages of one run share, and what they leave for its Result."""

    p: StyleParams
    stages: list[Stage]
    total: int
    progress: Progress
    frame_size: tuple[int, int]
    start: int
    t0: float
    content: Image.Image
    styles: list[StyleImage]
    init_image: Image.Image | None
    cache: TargetCache | None
    budget_bytes: int | None  # what each stage's passes may use (memory.choose)
    forced: Techniques | None  # the same techniques for every stage, instead of the budget's
    keep: Image.Image | None = None  # what stays the content (regions.py)
    regions: dict | None = None  # the last stage's regions, for the Result
    frames: "Frames | None" = None
    tap: "LossTap | None" = None  # on CUDA: the losses progress shows, read behind the GPU
    t_opt: float | None = None  # when the first step began
    t_end: float = 0.0  # when the last stage's steps ended
    targets: float = 0.0
    optimise: float = 0.0
    losses: Losses | None = None
    palette: Palette | None = None
    size: tuple[int, int] = (0, 0)
    restarts: int = 0
    cuda_graph: bool = False
    peak: int | None = None
    records: list[dict] = field(default_factory=list)
    work_done: float = 0.0  # pixel-steps run in this call (the ETA's pace)
    e512: float = 0.0  # passes of the picture run in this call, in E512
    sizes: list[int] = field(default_factory=list)  # each stage's pixels, for the ETA

    def work_left(self, step: int) -> float:
        """Pixel-steps after global step `step`."""
        left, before = 0.0, 0
        for st, px in zip(self.stages, self.sizes):
            left += px * max(0, min(st.steps, before + st.steps - step))
            before += st.steps
        return left

    def result(self, device: Device, precision: str, x: torch.Tensor) -> Result:
        frames = self.frames.all()
        shown = self.palette.show(x)
        if frames:
            frames[-1] = frame_of(shown, self.frame_size, None, shown=True)
        return Result(
            image=images.to_pil(shown),
            image16=images.to_uint16_hwc(shown) if self.p.bits == 16 else None,
            frames=frames,
            losses=self.losses.as_floats(),
            steps=self.total,
            size=self.size,
            device=str(device),
            device_name=device.name,
            precision=precision,
            # targets: each stage's style Grams and content features; optimise: the steps
            timings={"targets": self.targets, "optimise": self.optimise},
            restarts=self.restarts,
            cuda_graph=self.cuda_graph,
            e512=round(self.e512, 2),
            resumed_from=self.start,
            peak_memory_bytes=self.peak,
            stages=self.records,
            regions=self.regions,
        )
