"""The job file: its keys, their validation, and how a sidecar names its input files.

One key table serves sidecars, config.yaml `defaults:` and `nstd stylize`, so a key means the same
everywhere and its error reads the same. A sidecar is read with a size cap and a YAML loader that
builds only plain data and refuses anchors and aliases (no alias bombs, no Python tags), and every
path it names must resolve inside the inbox before any file is opened.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nstd.engine.stylize import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, StyleParams
from nstd.engine.vgg import CONV_LAYERS
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
    "gif": Field(dict((k, f.default) for k, f in GIF_FIELDS.items()), "progress GIF, or false", _gif),
    "output": Field({"format": "png"}, "result format", section(OUTPUT_FIELDS)),
    "priority": Field(0, "higher runs first", integer(-1_000_000, 1_000_000)),
}


def style_params(job: dict) -> StyleParams:
    """Engine parameters from a validated job dict (every key present)."""
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
    )


def merge(defaults: dict, overrides: dict) -> dict:
    """`defaults` (already valid) with `overrides` (raw) validated on top."""
    return validate({**defaults, **overrides}, JOB_FIELDS)


# --------------------------------------------------------------------------- sidecars

SIDECAR_SUFFIXES = (".yaml", ".yml")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class JobError(Exception):
    """A job that cannot run. `kind` is a short word for error.yaml; `message` says what to fix."""

    def __init__(self, kind: str, message: str, stage: str = "intake"):
        self.kind = kind
        self.message = message
        self.stage = stage
        super().__init__(message)


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a job file never needs them."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"anchors and aliases are not allowed in a job file (line {event.start_mark.line + 1})")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(f"anchors and aliases are not allowed in a job file (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def read_sidecar(path: Path, max_bytes: int) -> dict:
    """The sidecar's mapping, or JobError("invalid job file") saying why not."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise JobError("unreadable", f"{path.name}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise JobError("invalid job file", f"{path.name}: larger than {max_bytes} bytes (limits.max_sidecar_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError("invalid job file", f"{path.name}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise JobError("invalid job file", f"{path.name}: not valid YAML: {_one_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError("invalid job file", f"{path.name}: expected a mapping of keys, got {type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


@dataclass
class JobFiles:
    """The files a sidecar names, as paths inside the inbox."""

    sidecar: Path
    content: Path
    styles: list[tuple[Path, float]]
    init: Path | None = None
    #: problems found while resolving (outside the inbox, missing); empty when usable
    missing: list[Path] = field(default_factory=list)

    def inputs(self) -> list[Path]:
        """Every file of the job, sidecar last (it is the commit marker), without duplicates."""
        files = [self.content, *(p for p, _ in self.styles)]
        if self.init is not None:
            files.append(self.init)
        return list(dict.fromkeys(files)) + [self.sidecar]


def job_name(sidecar: Path) -> str:
    return sidecar.name[: -len(sidecar.suffix)]


def inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_path(value: Any, key: str, sidecar: Path, inbox: Path) -> Path:
    """A path named by the sidecar, checked to stay inside the inbox, symlinks included."""
    if not isinstance(value, str) or not value.strip():
        raise JobError("invalid job file", f"{key}: expected a file name, got {value!r}")
    if "\0" in value:
        raise JobError("invalid job file", f"{key}: the file name contains a NUL character")
    if os.path.isabs(value) or value.startswith("~"):
        raise JobError("path outside inbox", f"{key}: {value!r} is an absolute path; name a file beside the job file")
    if ".." in Path(value).parts:
        raise JobError("path outside inbox", f"{key}: {value!r} leads out of the inbox ('..' is not allowed)")
    path = sidecar.parent / value
    real_inbox = Path(os.path.realpath(inbox))
    if not inside(Path(os.path.realpath(path)), real_inbox):
        raise JobError("path outside inbox", f"{key}: {value!r} is a link that leads out of the inbox")
    return path


def _by_convention(sidecar: Path, role: str) -> Path | None:
    """`<name>.<role>.<ext>` beside the sidecar, if exactly one such image exists."""
    stem = f"{job_name(sidecar)}.{role}"
    found = [
        p for p in sidecar.parent.iterdir() if p.name.startswith(stem + ".") and p.suffix.lower() in IMAGE_SUFFIXES
        and p.name[: -len(p.suffix)] == stem
    ]
    if len(found) > 1:
        names = ", ".join(sorted(p.name for p in found))
        raise JobError("invalid job file", f"{role}: several files match {stem}.*: {names}; name one in the job file")
    return found[0] if found else None


def resolve_files(data: dict, sidecar: Path, inbox: Path) -> JobFiles:
    """Which files the job uses: named in the sidecar, or `<name>.content.*` / `<name>.style.*`."""
    if "content" in data:
        content = resolve_path(data["content"], "content", sidecar, inbox)
    else:
        content = _by_convention(sidecar, "content") or sidecar.parent / f"{job_name(sidecar)}.content.jpg"
    style = data.get("style")
    styles: list[tuple[Path, float]] = []
    if style is None:
        styles = [(_by_convention(sidecar, "style") or sidecar.parent / f"{job_name(sidecar)}.style.jpg", 1.0)]
    elif isinstance(style, str):
        styles = [(resolve_path(style, "style", sidecar, inbox), 1.0)]
    elif isinstance(style, list) and style:
        for i, item in enumerate(style):
            key = f"style[{i}]"
            if isinstance(item, str):
                styles.append((resolve_path(item, key, sidecar, inbox), 1.0))
                continue
            if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight"}:
                raise JobError("invalid job file", f"{key}: expected a file name or {{path: FILE, weight: NUMBER}}, got {item!r}")
            try:
                weight = number(0, 1e6)(item.get("weight", 1.0), f"{key}.weight")
            except SchemaError as exc:
                raise JobError("invalid job file", str(exc)) from None
            styles.append((resolve_path(item["path"], f"{key}.path", sidecar, inbox), weight))
        if sum(w for _, w in styles) <= 0:
            raise JobError("invalid job file", "style: the blend weights add up to 0")
    else:
        raise JobError("invalid job file", f"style: expected a file name or a list of them, got {style!r}")
    init = None
    init_value = data.get("init")
    if isinstance(init_value, str) and init_value not in ("content", "noise"):
        init = resolve_path(init_value, "init", sidecar, inbox)
    files = JobFiles(sidecar=sidecar, content=content, styles=styles, init=init)
    files.missing = [p for p in files.inputs() if not p.is_file()]
    return files


#: Keys a sidecar may hold besides the job keys.
FILE_KEYS = ("content", "style")


def job_settings(data: dict, defaults: dict) -> dict:
    """The effective job keys: config defaults with the sidecar's own on top, validated."""
    overrides = {k: v for k, v in data.items() if k not in FILE_KEYS}
    try:
        return merge(defaults, overrides)
    except SchemaError as exc:
        raise JobError("invalid job file", str(exc)) from None
