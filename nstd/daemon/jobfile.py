"""The job file: reading it safely, the files it names, and the one check of a job.

A sidecar is read with a size cap and a YAML loader that builds only plain data and refuses
anchors and aliases (no alias bombs, no Python tags), and every path it names must resolve inside
the inbox before any file is opened. `check_job()` is the verdict both intake and `nstd validate`
give: keys, inputs present, images decodable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nstd.errors import ErrorKind, JobError
from nstd.jobkeys import merge
from nstd.schema import SchemaError, number


SIDECAR_SUFFIXES = (".yaml", ".yml")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


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
    """The sidecar's mapping, or JobError(ErrorKind.INVALID_JOB_FILE) saying why not."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise JobError(ErrorKind.UNREADABLE, f"{path.name}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: larger than {max_bytes} bytes (limits.max_sidecar_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: not valid YAML: {_one_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: expected a mapping of keys, got {type(data).__name__}")
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
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: expected a file name, got {value!r}")
    if "\0" in value:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: the file name contains a NUL character")
    if os.path.isabs(value) or value.startswith("~"):
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {value!r} is an absolute path; name a file beside the job file")
    if ".." in Path(value).parts:
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {value!r} leads out of the inbox ('..' is not allowed)")
    path = sidecar.parent / value
    real_inbox = Path(os.path.realpath(inbox))
    if not inside(Path(os.path.realpath(path)), real_inbox):
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {value!r} is a link that leads out of the inbox")
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
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{role}: several files match {stem}.*: {names}; name one in the job file")
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
                raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: expected a file name or {{path: FILE, weight: NUMBER}}, got {item!r}")
            try:
                weight = number(0, 1e6)(item.get("weight", 1.0), f"{key}.weight")
            except SchemaError as exc:
                raise JobError(ErrorKind.INVALID_JOB_FILE, str(exc)) from None
            styles.append((resolve_path(item["path"], f"{key}.path", sidecar, inbox), weight))
        if sum(w for _, w in styles) <= 0:
            raise JobError(ErrorKind.INVALID_JOB_FILE, "style: the blend weights add up to 0")
    else:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"style: expected a file name or a list of them, got {style!r}")
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
        raise JobError(ErrorKind.INVALID_JOB_FILE, str(exc)) from None


@dataclass
class CheckedJob:
    """A job that passed the check: its files, its effective settings and its images' sizes."""

    files: JobFiles
    settings: dict
    sizes: dict[Path, tuple[int, int]]


def check_job(data: dict, files: JobFiles, defaults: dict, max_pixels: int) -> CheckedJob:
    """The one verdict on a job, for intake and `nstd validate` alike: its keys are valid, every
    input is there, and every image decodes (a bad image never reaches a worker)."""
    from nstd.engine.images import ImageError, open_image  # torch: only for a real check

    settings = job_settings(data, defaults)
    if files.missing:
        raise JobError(ErrorKind.MISSING_INPUT, "not found: " + ", ".join(str(p) for p in files.missing))
    sizes = {}
    for path in files.inputs()[:-1]:
        try:
            sizes[path] = open_image(path, max_pixels).size
        except ImageError as exc:
            raise JobError(ErrorKind.BAD_IMAGE, str(exc)) from None
    return CheckedJob(files, settings, sizes)
