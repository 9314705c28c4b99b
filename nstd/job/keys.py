"""A job's keys (size, steps, weights, ...): their defaults and validation.

One key table serves job files, config.yaml `defaults:` and `nstd stylize`, so a key means the same
everywhere and its error reads the same. Reading a job file: nstd/job/file.py; the keys typed, for what runs a job: nstd/job/spec.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from nstd.engine.options import COLOR_MODES, CONV_LAYERS, POOLINGS, STYLE_LOSSES
from nstd.engine.params import StyleParams
from nstd.engine.schedule import MAX_STAGES
from nstd.schema import Field, SchemaError, choice, integer, list_of, number, string, validate

layer = choice(*CONV_LAYERS)

#: The contract's defaults, written once: the engine's own (StyleParams). The keys below, config.yaml's
#: built-in `defaults:` and `nstd stylize --help` all take theirs from here.
_E = {f.name: f.default for f in dataclasses.fields(StyleParams)}


def _gif(v: Any, key: str) -> dict | bool:
    if v is False:
        return False
    if v is True:
        v = {}
    if not isinstance(v, dict):
        raise SchemaError(key, f"expected false or a mapping like {{every: 5, fps: 12}}, got {v!r}")
    return validate(v, GIF_FIELDS, key)


_size = integer(32, 8192)
_steps = integer(1, 100_000)


def _stages(v: Any, key: str) -> str | int | list[dict]:
    """`auto`, a number of stages, or a list of {size, steps} with sizes growing."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_STAGES):
        return v
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_STAGES:
        raise SchemaError(key, f"expected auto, a number of stages (1 = one scale) up to {MAX_STAGES}, or a list "
                          f"like [{{size: 256, steps: 300}}, {{size: 512, steps: 150}}], got {v!r}"[:300])
    out: list[dict] = []
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(item, dict) or set(item) != {"size", "steps"}:
            raise SchemaError(where, f"expected a mapping with exactly size and steps, got {item!r}"[:300])
        size, steps = _size(item["size"], f"{where}.size"), _steps(item["steps"], f"{where}.steps")
        if out and size <= out[-1]["size"]:
            raise SchemaError(f"{where}.size", f"each stage must be larger than the one before ({size} <= {out[-1]['size']})")
        out.append({"size": size, "steps": steps})
    return out


GIF_FIELDS = {
    "every": Field(_E["frame_every"], "a frame every N steps", integer(1, 100_000)),
    "fps": Field(12.0, "frames per second when played", number(0.5, 50)),
    "max_size": Field(_E["frame_max_size"], "long edge of the GIF's frames, px (frames are scaled down, never up)", integer(32, 1024)),
}

OUTPUT_FIELDS = {
    "format": Field("png", "png | jpg | webp | tiff", choice("png", "jpg", "webp", "tiff")),
    "quality": Field(None, "jpg and webp: 1-100 (default 95)", lambda v, k: integer(1, 100)(v, k) if v is not None else None),
    "bits": Field(_E["bits"], "bits per channel: 8, or 16 with format tiff (for prints: no banding in smooth skies)",
                  lambda v, k: _bits(v, k)),
}


def _bits(v: Any, key: str) -> int:
    if v in (8, 16) and not isinstance(v, bool):
        return v
    raise SchemaError(key, f"expected 8 or 16, got {v!r}")


def _output(v: Any, key: str) -> dict:
    """output: its keys, and what they mean together (16 bits: tiff only; quality: jpg, webp)."""
    out = validate(v, OUTPUT_FIELDS, key)
    if out["bits"] == 16 and out["format"] != "tiff":
        raise SchemaError(f"{key}.bits", f"16 bits per channel are written as tiff only (format: tiff), not {out['format']}")
    if out["quality"] is not None and out["format"] not in ("jpg", "webp"):
        raise SchemaError(f"{key}.quality", f"applies to jpg and webp, not {out['format']}")
    return out

#: Every optional key of a job, with the contract's defaults.
JOB_FIELDS: dict[str, Any] = {
    "size": Field(_E["size"], "long edge of the result, px", _size),
    "steps": Field(_E["steps"], "optimisation steps (one forward+backward each) of the first stage", _steps),
    "stages": Field(_E["stages"], "coarse-to-fine: auto | a number of stages (1 = one scale) | a list of {size, steps} "
                    "(its last size is the result's)", _stages),
    "stage_start": Field(_E["stage_start"], "stages: auto: the first stage's long edge is near this, px (and one "
                         "stage up to 3 x this)", integer(32, 8192)),
    "stage_factor": Field(_E["stage_factor"], "each stage's long edge over the one before's", number(1.1, 4.0)),
    "stage_steps": Field(_E["stage_steps"], "each later stage's steps over the one before's", number(0.05, 1.0)),
    "anchor_size": Field(_E["anchor_size"], "a stage larger than this also matches the style with the picture scaled down to "
                         "this long edge, so strokes keep their size relative to the picture; 0 = off",
                         integer(0, 8192)),
    "grain": Field(_E["grain"], "rms of the fixed-seed grain added to each stage's start picture, in 8-bit levels, so "
                   "that flat regions grow strokes instead of a periodic grid (docs/quality.md); 0 = none",
                   number(0, 64)),
    "jitter": Field(_E["jitter"], "each step shows the network the picture shifted by up to this many px (one of 8 "
                    "fixed shifts in turn, reflected at the edges), so the pools' lattice grows no grid in flat "
                    "regions (docs/quality.md); 0 = none", integer(0, 16)),
    "style_loss": Field(_E["style_loss"], "gram | w2 | sliced: match Gram matrices (Gatys), Gaussian fits "
                        "(Wasserstein-2) or whole distributions (sliced Wasserstein) of the style's features "
                        "(docs/quality.md)", choice(*STYLE_LOSSES)),
    "optimizer": Field(_E["optimizer"], "lbfgs | adam", choice("lbfgs", "adam")),
    "content_weight": Field(_E["content_weight"], "alpha: weight of the content term", number(0, 1e12)),
    "style_weight": Field(_E["style_weight"], "beta: weight of the style term", number(0, 1e12)),
    "tv_weight": Field(_E["tv_weight"], "total-variation smoothing; 0 = off, about 1 = visible", number(0, 1e12)),
    "init": Field(_E["init"], "content | color-matched (the content in the style's colours) | noise | an image file", string),
    "pooling": Field(_E["pooling"], " | ".join(POOLINGS), choice(*POOLINGS)),
    "content_layers": Field(list(_E["content_layers"]), "VGG-19 layers for content", list_of(layer, 1)),
    "style_layers": Field(list(_E["style_layers"]), "VGG-19 layers for style", list_of(layer, 1)),
    "seed": Field(_E["seed"], "random seed (noise init, the grain, the jitter's shifts); same seed, same CPU result", integer(0, 2**63 - 1)),
    "style_scale": Field(_E["style_scale"], "style image size relative to the result's long edge", number(0.1, 4.0)),
    "preserve_color": Field(_E["preserve_color"], "none | luminance | histogram: keep the content's colours",
                            choice(*COLOR_MODES)),
    "gif": Field(dict((k, f.default) for k, f in GIF_FIELDS.items()), "progress GIF, or false", _gif),
    "output": Field({k: f.default for k, f in OUTPUT_FIELDS.items()}, "the result's file: format, quality, bits", _output),
    "priority": Field(0, "higher runs first", integer(-1_000_000, 1_000_000)),
}


def merge(defaults: dict, overrides: dict) -> dict:
    """`defaults` (already valid) with `overrides` (raw) validated on top. A list of stages sets
    `size` and `steps` (its last stage's size, its first stage's steps), so job.yaml says what
    runs; a `size` or `steps` given beside a list must agree with it (nothing is silently ignored)."""
    job = validate({**defaults, **overrides}, JOB_FIELDS)
    stages = job["stages"]
    if isinstance(stages, list):
        implied = {"size": stages[-1]["size"], "steps": stages[0]["steps"]}
        for key, value in implied.items():
            if key in overrides and overrides[key] != value:
                raise SchemaError("stages", f"the list's {'last size' if key == 'size' else 'first steps'} is "
                                  f"{value}, but {key} says {overrides[key]!r}: with a list of stages, each stage "
                                  f"names its size and steps (leave {key} out, or make them agree)")
        job.update(implied)
    return job
