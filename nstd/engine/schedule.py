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

#: A later stage never gets fewer steps than this (unless `steps` itself is fewer).
MIN_STAGE_STEPS = 30
#: `auto` runs one stage up to this many times `stage_start`.
AUTO_SINGLE = 3
#: The most stages a run has (the job key's limit too).
MAX_STAGES = 12
#: The defaults of the job keys (jobkeys.py).
DEFAULT_START, DEFAULT_FACTOR, DEFAULT_STEP_RATIO = 256, 2.0, 0.5


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
