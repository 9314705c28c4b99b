"""A job's keys (size, steps, weights, ...): their defaults, validation and engine parameters.

One key table serves job files, config.yaml `defaults:` and `nstd stylize`, so a key means the same
everywhere and its error reads the same. Reading a job file is the daemon's (nstd/daemon/jobfile.py).
"""
from __future__ import annotations

from typing import Any

from nstd.engine.options import COLOR_MODES, CONV_LAYERS, DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
from nstd.schema import Field, SchemaError, choice, integer, list_of, number, section, string, validate

layer = choice(*CONV_LAYERS)


def _gif(v: Any, key: str) -> dict | bool:
    if v is False:
        return False
    if v is True:
        v = {}
    if not isinstance(v, dict):
        raise SchemaError(key, f"expected false or a mapping like {{every: 5, fps: 12}}, got {v!r}")
    return validate(v, GIF_FIELDS, key)


GIF_FIELDS = {
    "every": Field(5, "a frame every N steps", integer(1, 100_000)),
    "fps": Field(12.0, "frames per second when played", number(0.5, 50)),
    "max_size": Field(512, "long edge of the GIF's frames, px (frames are scaled down, never up)", integer(32, 4096)),
}

OUTPUT_FIELDS = {
    "format": Field("png", "png | jpg | webp", choice("png", "jpg", "webp")),
}

#: Every optional key of a job, with the contract's defaults.
JOB_FIELDS: dict[str, Any] = {
    "size": Field(512, "long edge of the result, px", integer(32, 8192)),
    "steps": Field(300, "optimisation steps (one forward+backward each)", integer(1, 100_000)),
    "optimizer": Field("lbfgs", "lbfgs | adam", choice("lbfgs", "adam")),
    "content_weight": Field(1.0, "alpha: weight of the content term", number(0, 1e12)),
    "style_weight": Field(1.0e4, "beta: weight of the style term", number(0, 1e12)),
    "tv_weight": Field(0.0, "total-variation smoothing; 0 = off, about 1 = visible", number(0, 1e12)),
    "init": Field("content", "content | noise | an image file", string),
    "pooling": Field("avg", "avg | max", choice("avg", "max")),
    "content_layers": Field(list(DEFAULT_CONTENT_LAYERS), "VGG-19 layers for content", list_of(layer, 1)),
    "style_layers": Field(list(DEFAULT_STYLE_LAYERS), "VGG-19 layers for style", list_of(layer, 1)),
    "seed": Field(0, "random seed (noise init); same seed, same CPU result", integer(0, 2**63 - 1)),
    "style_scale": Field(1.0, "style image size relative to the result's long edge", number(0.1, 4.0)),
    "preserve_color": Field("none", "none | luminance | histogram: keep the content's colours",
                            choice(*COLOR_MODES)),
    "gif": Field(dict((k, f.default) for k, f in GIF_FIELDS.items()), "progress GIF, or false", _gif),
    "output": Field({"format": "png"}, "result format", section(OUTPUT_FIELDS)),
    "priority": Field(0, "higher runs first", integer(-1_000_000, 1_000_000)),
}


def style_params(job: dict) -> "StyleParams":
    """Engine parameters from a validated job dict (every key present)."""
    from nstd.engine.stylize import StyleParams  # torch: only where a job is run

    gif = job["gif"]
    return StyleParams(
        size=job["size"],
        steps=job["steps"],
        optimizer=job["optimizer"],
        content_weight=job["content_weight"],
        style_weight=job["style_weight"],
        tv_weight=job["tv_weight"],
        init=job["init"] if job["init"] in ("content", "noise") else "image",
        pooling=job["pooling"],
        content_layers=tuple(job["content_layers"]),
        style_layers=tuple(job["style_layers"]),
        seed=job["seed"],
        style_scale=job["style_scale"],
        frame_every=gif["every"] if gif else 0,
        frame_max_size=gif["max_size"] if gif else 512,
        preserve_color=job.get("preserve_color", "none"),  # a claim from before the key
    )


def merge(defaults: dict, overrides: dict) -> dict:
    """`defaults` (already valid) with `overrides` (raw) validated on top."""
    return validate({**defaults, **overrides}, JOB_FIELDS)
