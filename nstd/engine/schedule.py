"""Coarse-to-fine: the stages a run goes through, from a small picture up to the size asked.

Why: VGG sees a style at the scale of its receptive fields (about 200 px for conv5_1), so a
picture optimised at 2048 px in one go gets tiny strokes and looks like a lightly textured photo.
Started small, the picture takes the style's large forms where they are cheap to find; each later
stage starts from the one before, upsampled, and adds the detail its size allows, in fewer steps.

The rule (`plan`), with the defaults `stages: auto`, `stage_start: 256`, `stage_factor: 2`,
`stage_steps: 0.5`: a job up to `AUTO_SINGLE` x `stage_start` (768 px) runs in one stage, the
classic run (the contract's default job is unchanged); above, the last stage is the size asked and
the stages before it are smaller by the factor each, as many as bring the first one nearest to
`stage_start` (at most MAX_STAGES). A number asks for that many stages below the size, by the
factor; a list names each stage's size and steps. The first stage runs `steps`; each later one
`stage_steps` times the one before, never fewer than `MIN_STAGE_STEPS` (or `steps`, when that is
fewer). Stages that would round under 32 px are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from nstd.engine.images import fit_long_edge  # torch-free: Pillow only

#: A later stage never gets fewer steps than this (unless `steps` itself is fewer).
MIN_STAGE_STEPS = 30
#: `auto` runs one stage up to this many times `stage_start`.
AUTO_SINGLE = 3
#: The most stages a run has (the job key's limit too).
MAX_STAGES = 12
#: The coarse-to-fine keys' defaults (StyleParams; nstd/job/keys.py takes them from there).
DEFAULT_START, DEFAULT_FACTOR, DEFAULT_STEP_RATIO = 256, 2.0, 0.5
#: A style image is never seen larger than this (the largest result's edge): `size: 8192` with
#: `style_scale: 4` would otherwise make a 32768 px style, 10 GB as one float tensor.
MAX_STYLE_EDGE = 8192


@dataclass(frozen=True)
class Stage:
    size: int  # long edge, px
    steps: int


StagesSetting = Union[str, int, Sequence[Stage]]


def plan(size: int, steps: int, stages: StagesSetting = "auto", start: int = DEFAULT_START,
         factor: float = DEFAULT_FACTOR, step_ratio: float = DEFAULT_STEP_RATIO) -> list[Stage]:
    """The stages of one run (see the module's docstring). An explicit list is returned as given."""
    if not isinstance(stages, (str, int)):
        out = [s if isinstance(s, Stage) else Stage(int(s["size"]), int(s["steps"])) for s in stages]
        if not out:
            raise ValueError("stages: the list is empty")
        return out
    if stages == "auto":
        count = 1 if size <= AUTO_SINGLE * start else min(MAX_STAGES, 1 + round(math.log(size / start) / math.log(factor)))
    elif isinstance(stages, int) and stages >= 1:
        count = stages
    else:
        raise ValueError(f"stages: expected auto, a number of stages or a list, got {stages!r}")
    sizes = [max(32, round(size / factor ** (count - 1 - i))) for i in range(count)]
    out, n = [], steps
    for i, s in enumerate(sizes):
        if i:
            n = max(round(n * step_ratio), min(MIN_STAGE_STEPS, steps))
        if out and s <= out[-1].size:  # factor 1.x at a tiny size: sizes that round alike merge
            continue
        out.append(Stage(s, n))
    return out


def viable(stages: Sequence[Stage], short_edges: Callable[[int], int], minimum: int) -> list[Stage]:
    """`stages` without the early ones whose picture would be too thin for the network
    (`short_edges(size)`: the smallest edge a stage of that long edge needs, content or style;
    `minimum`: what the deepest layer's pooling needs). The last stage always stays."""
    kept = [s for s in stages[:-1] if short_edges(s.size) >= minimum]
    return [*kept, stages[-1]]


def style_edge(content_size: tuple[int, int], size: int, style_scale: float) -> int:
    """The style image's long edge for a result of long edge `size` from content of `content_size`."""
    return min(MAX_STYLE_EDGE, max(16, round(max(fit_long_edge(content_size, size)) * style_scale)))


def anchor_hw(content_size: tuple[int, int], anchor_size: int, size: int) -> tuple[int, int] | None:
    """(h, w) of the style anchor's pass for a stage of long edge `size`, or None where the stage
    is not larger than the anchor (by a quarter: a near-equal size adds nothing)."""
    if not anchor_size or size <= 1.25 * anchor_size:
        return None
    w, h = fit_long_edge(content_size, anchor_size)
    return h, w


def deepest(layers: Sequence[str]) -> str:
    """The deepest of `layers` (named convN_M)."""
    return max(layers, key=lambda n: (int(n[4]), n))


def smallest_edge(layers: Sequence[str]) -> int:
    """The shortest edge a picture may have for the deepest of `layers`: each pooling before it
    halves the picture, and a pool needs two pixels."""
    return 2 ** (int(deepest(layers)[4]) - 1)


def runnable(content_size: tuple[int, int], style_sizes: Sequence[tuple[int, int]], stages: Sequence[Stage],
             style_scale: float, layers: Sequence[str]) -> list[Stage]:
    """`stages` less the early ones whose content or style would be too thin for `layers` (a
    panorama, a small style_scale); the last one always stays (`too_small` says if it may run)."""

    def short_edges(size: int) -> int:
        edge = style_edge(content_size, size, style_scale)
        return min(min(fit_long_edge(content_size, size)), *(min(fit_long_edge(s, edge)) for s in style_sizes))

    return viable(stages, short_edges, smallest_edge(layers))


def too_small(content_size: tuple[int, int], style_sizes: Sequence[tuple[int, int]], stages: Sequence[Stage],
              style_scale: float, anchor_size: int, layers: Sequence[str],
              style_layers: Sequence[str] | None = None) -> str | None:
    """Why some pass of this run would be too small for the network, or None: the content at every
    stage that runs (early ones too thin are left out, see `viable`), each style at its scale, and
    the anchor. The one check, for `nstd validate`, intake and the engine alike."""
    minimum, last = smallest_edge(layers), deepest(layers)

    def say(what: str, w: int, h: int, need: int, layer: str) -> str:
        return (f"{what} would be {w}x{h} px: its short edge is under the {need} px that {layer} needs "
                f"(a larger size, a larger style_scale or anchor_size, or a less thin picture)")

    for st in runnable(content_size, style_sizes, stages, style_scale, layers):
        w, h = fit_long_edge(content_size, st.size)
        if min(w, h) < minimum:
            return say(f"the content ({content_size[0]}x{content_size[1]}) at {st.size} px", w, h, minimum, last)
        edge = style_edge(content_size, st.size, style_scale)
        for i, s in enumerate(style_sizes):
            sw, sh = fit_long_edge(s, edge)
            if min(sw, sh) < minimum:
                name = "the style" if len(style_sizes) == 1 else f"style {i + 1}"
                return say(f"{name} ({s[0]}x{s[1]}) read at {edge} px for the {st.size} px stage", sw, sh, minimum, last)
        anchor = anchor_hw(content_size, anchor_size, st.size)
        anchor_layers = style_layers or layers
        need = smallest_edge(anchor_layers)
        if anchor is not None and min(anchor) < need:
            return say(f"the style anchor (anchor_size {anchor_size})", anchor[1], anchor[0], need,
                       deepest(anchor_layers))
    return None


def total_steps(stages: Sequence[Stage]) -> int:
    return sum(s.steps for s in stages)


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, int]:
    """(stage index, steps done before that stage) for the global step number `step` (1-based):
    a checkpoint at a global step resumes in its stage."""
    before = 0
    for i, s in enumerate(stages):
        if step <= before + s.steps:
            return i, before
        before += s.steps
    return len(stages) - 1, before - stages[-1].steps
