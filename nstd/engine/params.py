"""What a stylization is asked (`StyleParams`) and what it gives back (`Result`).

Torch-free (Pillow only): job keys become StyleParams without loading the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from PIL import Image

from nstd.engine import schedule
from nstd.engine.options import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
from nstd.engine.schedule import Stage, StagesSetting

#: E512, the cost that carries from one machine to any other: one forward+backward pass of the
#: picture over 512 x 512 pixels. A forward alone (a stage's closing check) counts a third.
E512_PIXELS = 512 * 512
FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class StyleParams:
    """What one stylization needs beyond its images. Defaults are the contract's."""

    size: int = 512
    steps: int = 300
    optimizer: str = "lbfgs"
    content_weight: float = 1.0
    style_weight: float = 1.0e4
    tv_weight: float = 0.0
    init: str = "content"  # content | color-matched | noise | image (then pass init_image)
    pooling: str = "avg"
    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    seed: int = 0
    style_scale: float = 1.0
    frame_every: int = 5  # 0: no frames
    frame_max_size: int = 512
    preserve_color: str = "none"  # none | luminance | histogram (see engine/color.py)
    bits: int = 8  # 16: the result is also kept as 16 bits per channel (Result.image16), for a tiff
    stages: StagesSetting = "auto"  # coarse-to-fine (see engine/schedule.py); 1: one scale
    stage_start: int = schedule.DEFAULT_START
    stage_factor: float = schedule.DEFAULT_FACTOR
    stage_steps: float = schedule.DEFAULT_STEP_RATIO
    #: a stage larger than this also matches the style at this long edge (0: off); see anchor.Anchor
    anchor_size: int = 512
    #: how style statistics are matched: gram | w2 | sliced (options.STYLE_LOSSES)
    style_loss: str = "gram"
    #: rms of the fixed-seed grain added to each stage's start picture, in 8-bit levels (see start.grain)
    grain: float = 8.0
    #: each step sees the picture shifted by up to this many px, so the pools' lattice leaves no grid (see jitter.py)
    jitter: int = 8

    def schedule(self) -> list[Stage]:
        """The stages asked for, before `plan` leaves out those too thin for the network."""
        return schedule.plan(self.size, self.steps, self.stages, self.stage_start, self.stage_factor, self.stage_steps)

    def plan(self, content_size: tuple[int, int], style_sizes: Sequence[tuple[int, int]]) -> list[Stage]:
        """The stages that run for this content and these styles: `schedule()` less the early
        ones too thin for the network (a panorama, a small style_scale). A run whose last stage,
        a style or the anchor would still be too small is refused with the reason (ValueError)."""
        layers, stages = (*self.content_layers, *self.style_layers), self.schedule()
        why = schedule.too_small(content_size, style_sizes, stages, self.style_scale, self.anchor_size, layers,
                                 self.style_layers)
        if why:
            raise ValueError(why)
        return schedule.runnable(content_size, style_sizes, stages, self.style_scale, layers)

    def total_steps(self, content_size: tuple[int, int], style_sizes: Sequence[tuple[int, int]]) -> int:
        """The steps a run of this content and these styles makes, the total its progress
        reports: those of the stages `plan` keeps, not of every stage `schedule()` asks for."""
        return schedule.total_steps(self.plan(content_size, style_sizes))

    def at_size(self, size: int) -> "StyleParams":
        """The same run with the result's long edge `size` (a memory budget's shrink): a list of
        stages is scaled with it."""
        stages = self.stages
        if not isinstance(stages, (str, int)):
            stages = tuple(Stage(max(32, round(st.size * size / self.size)), st.steps) for st in stages)
        return replace(self, size=size, stages=stages)


@dataclass
class Result:
    image: Image.Image
    frames: list[Image.Image]
    losses: dict[str, float]
    steps: int
    size: tuple[int, int]  # (width, height) actually used
    device: str
    precision: str
    device_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    restarts: int = 0  # L-BFGS restarts after a diverging step
    resumed_from: int = 0  # the checkpoint's step, when the run resumed one
    cuda_graph: bool = False  # the steps after the warm-up were replayed from a captured CUDA graph
    #: the picture's passes through the network, each counted as its pixels over 512 x 512 (see E512)
    e512: float = 0.0
    #: one record a stage: size [w, h], steps, seconds, peak memory, the memory techniques and why
    stages: list[dict] = field(default_factory=list)
    #: (H, W, 3) uint16 numpy array of the result, when StyleParams.bits is 16 (else None)
    image16: object = None
    #: with masks or a keep mask (regions.py): the share of the picture each style covers
    #: ("styles", in the styles' order), "keep" (kept as the content) and "no_style" (no mask
    #: covers it: those pixels keep the content too); None for a run without masks
    regions: dict | None = None
