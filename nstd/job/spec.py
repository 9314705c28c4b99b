"""One job's settings, typed, with its stages resolved once.

Built (`Job.of`) from the validated job keys: a job file with the config's defaults, `nstd
stylize`'s options, or the settings a claim.json holds (one written by an older nstd lacks the
keys added since: they take the value that job was taken with). The worker, the engine's
parameters, the check against `limits:`, the free-disk check, report.json and `nstd validate` all
read this one object, so a key is interpreted in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from nstd.engine import schedule
from nstd.engine.options import NAMED_INITS
from nstd.engine.schedule import Stage

if TYPE_CHECKING:
    from nstd.engine.params import StyleParams


@dataclass(frozen=True)
class Gif:
    every: int
    fps: float
    max_size: int


@dataclass(frozen=True)
class Output:
    format: str
    quality: int | None
    bits: int


@dataclass(frozen=True)
class Job:
    """A job's keys as types. `steps` is the job key (the first stage's steps); `total_steps` is
    every planned stage's; the engine may drop early stages too small for the content (see
    `Engine.plan`), and its progress counts what it runs."""

    size: int
    steps: int
    #: the `stages` key as written: auto, a number, or explicit stages (a budget's shrink plans again from it)
    stages_key: str | int | tuple[Stage, ...]
    stage_start: int
    stage_factor: float
    stage_steps: float
    anchor_size: int
    grain: float
    jitter: int
    optimizer: str
    style_loss: str
    content_weight: float
    style_weight: float
    tv_weight: float
    #: content | noise | the name of an image file
    init: str
    pooling: str
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    seed: int
    style_scale: float
    preserve_color: str
    gif: Gif | None
    output: Output
    priority: int
    #: the validated keys as a mapping: what job.yaml and claim.json write
    settings: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, settings: dict) -> "Job":
        """From validated job keys (every current key present, or a claim's from before a key)."""
        s = settings
        stages = s.get("stages", 1)  # a claim from before the key: the single-scale run it was taken as
        gif = s.get("gif")
        out = s.get("output") or {}
        return cls(
            size=stages[-1]["size"] if isinstance(stages, list) else s["size"],
            steps=s["steps"],
            stages_key=tuple(Stage(st["size"], st["steps"]) for st in stages) if isinstance(stages, list) else stages,
            stage_start=s.get("stage_start", schedule.DEFAULT_START),
            stage_factor=s.get("stage_factor", schedule.DEFAULT_FACTOR),
            stage_steps=s.get("stage_steps", schedule.DEFAULT_STEP_RATIO),
            anchor_size=s.get("anchor_size", 0),  # a claim from before the key: as it was taken
            grain=s.get("grain", 0.0),  # likewise
            jitter=s.get("jitter", 0),  # likewise
            optimizer=s["optimizer"],
            style_loss=s.get("style_loss", "gram"),  # a claim from before the key: as it was taken
            content_weight=s["content_weight"],
            style_weight=s["style_weight"],
            tv_weight=s["tv_weight"],
            init=s["init"],
            pooling=s["pooling"],
            content_layers=tuple(s["content_layers"]),
            style_layers=tuple(s["style_layers"]),
            seed=s["seed"],
            style_scale=s["style_scale"],
            preserve_color=s.get("preserve_color", "none"),
            gif=Gif(gif["every"], gif["fps"], gif["max_size"]) if gif else None,
            output=Output(out.get("format", "png"), out.get("quality"), out.get("bits", 8)),
            priority=int(s.get("priority", 0)),
            settings=settings,
        )

    @cached_property
    def stages(self) -> list[Stage]:
        """The stages as planned for the asked size, before the content is seen (planned once)."""
        return schedule.plan(self.size, self.steps, self.stages_key, self.stage_start, self.stage_factor,
                             self.stage_steps)

    @property
    def total_steps(self) -> int:
        """Steps of every planned stage (what `limits.max_steps` bounds)."""
        return schedule.total_steps(self.stages)

    @property
    def layers(self) -> list[str]:
        return [*self.content_layers, *self.style_layers]

    def params(self) -> "StyleParams":
        """The engine's parameters for this job (torch: only where a job is run)."""
        from nstd.engine.params import StyleParams

        return StyleParams(
            size=self.size, steps=self.steps, stages=self.stages_key, stage_start=self.stage_start,
            stage_factor=self.stage_factor, stage_steps=self.stage_steps, anchor_size=self.anchor_size,
            grain=self.grain, jitter=self.jitter, optimizer=self.optimizer, style_loss=self.style_loss, content_weight=self.content_weight,
            style_weight=self.style_weight, tv_weight=self.tv_weight,
            init=self.init if self.init in NAMED_INITS else "image", pooling=self.pooling,
            content_layers=self.content_layers, style_layers=self.style_layers, seed=self.seed,
            style_scale=self.style_scale, frame_every=self.gif.every if self.gif else 0,
            frame_max_size=self.gif.max_size if self.gif else 512, preserve_color=self.preserve_color,
            bits=self.output.bits)
