"""The job file: reading it safely, the files it names, and the one check of a job.

A sidecar is read with a size cap and a YAML loader that builds only plain data and refuses
anchors and aliases (no alias bombs, no Python tags), and every path it names must resolve inside
the inbox before any file is opened. `check_job()` is the verdict both intake and `nstd validate`
give: keys, inputs present, images decodable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nstd import yamltext
from nstd.errors import ErrorKind, JobError
from nstd.engine.options import NAMED_INITS
from nstd.job.keys import JOB_FIELDS, merge
from nstd.job.spec import Job
from nstd.schema import SchemaError, number, unknown_key, yaml_problem
from nstd.state import safefs
from nstd.state.claim import JobFiles

SIDECAR_SUFFIXES = (".yaml", ".yml")
#: The note nstd leaves beside a waiting job file (nstd/daemon/inboxnote.py SUFFIX).
WAITING_NOTE = ".waiting.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: How deep lists and mappings may nest in a job file (a real one needs 3).
#: The most style images one job may blend.
MAX_STYLES = 16
NO_LINKS = ("nstd takes regular files only and never follows a link: a link that leads out of the inbox, "
            "or could at any moment, would let a job read what its dropper cannot")


def read_sidecar(path: Path, max_bytes: int, dir_fd: int | None = None,
                 limit_name: str = "limits.max_sidecar_bytes") -> dict:
    """The sidecar's mapping, or JobError(ErrorKind.INVALID_JOB_FILE) saying why not.

    Opened through its folder (or `dir_fd`, a descriptor of it) without following a link, and only
    if it is a regular file: a job file that is a link, FIFO, socket, device or folder is refused
    before anything opens it."""
    try:
        fd = safefs.open_inbox(path.parent) if dir_fd is None else os.dup(dir_fd)
        try:
            pinned = safefs.pin(fd, path.parent, path.name)
        finally:
            os.close(fd)
        try:
            with pinned.reader() as fh:
                raw = fh.read(max_bytes + 1)
        finally:
            pinned.close()
    except safefs.Refused as exc:
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX if exc.outside else ErrorKind.INVALID_JOB_FILE,
                       f"{path.name} {exc.reason}" + (f"; {NO_LINKS}" if exc.outside else "")) from None
    except OSError as exc:
        raise JobError(ErrorKind.UNREADABLE, f"{path.name}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeEncodeError:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name!r}: not a valid file name") from None
    if len(raw) > max_bytes:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: larger than {max_bytes:,} bytes ({limit_name})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: not UTF-8 text") from None
    try:
        data = yamltext.load(text)
    except yamltext.YAMLError as exc:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: not valid YAML: {yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{path.name}: expected a mapping of keys, got {type(data).__name__}")
    return data


def job_name(sidecar: Path) -> str:
    return sidecar.name[: -len(sidecar.suffix)]


def resolve_path(value: Any, key: str, sidecar: Path, inbox_fd: int) -> Path:
    """A path named by the sidecar, walked inside the inbox without following any link: it must be a
    regular file, or not there yet (then the job waits for it)."""
    if not isinstance(value, str) or not value.strip():
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: expected a file name, got {value!r}")
    if "\0" in value:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: the file name contains a NUL character")
    if os.path.isabs(value) or value.startswith("~"):
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {value!r} is an absolute path; name a file beside the job file")
    if ".." in Path(value).parts:
        raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {value!r} leads out of the inbox ('..' is not allowed)")
    if value.lower().endswith((*SIDECAR_SUFFIXES, WAITING_NOTE)):  # it would go with this job: never another's
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: {value!r} is a job file or nstd's note, not an image; "
                       "an input is never another job's file")
    check_input(inbox_fd, value, key)
    return sidecar.parent / value


def check_input(inbox_fd: int, rel: str, key: str) -> None:
    """A regular file inside the inbox, or nothing yet; anything else is the job's error."""
    try:
        safefs.regular(inbox_fd, rel)
    except FileNotFoundError:
        pass
    except safefs.Refused as exc:
        if exc.outside:
            raise JobError(ErrorKind.PATH_OUTSIDE_INBOX, f"{key}: {rel!r} {exc.reason}; {NO_LINKS}") from None
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: {rel!r} {exc.reason}") from None
    except PermissionError:
        raise JobError(ErrorKind.UNREADABLE, f"{key}: {rel!r} cannot be reached: permission denied "
                       "(the service user must be able to read it)") from None
    except UnicodeEncodeError:
        raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: {rel!r} is not a valid file name") from None
    except OSError as exc:
        raise JobError(ErrorKind.UNREADABLE, f"{key}: {rel!r} cannot be reached ({exc.strerror or exc})") from None


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
    """Which files the job uses: named in the sidecar, or `<name>.content.*` / `<name>.style.*`.

    Job files sit at the top of the inbox, so a name is relative to both. Every name is walked
    inside the inbox without following links (see safefs.py)."""
    try:
        inbox_fd = safefs.open_inbox(inbox)
    except OSError as exc:
        raise JobError(ErrorKind.UNREADABLE, f"the inbox cannot be read ({exc.strerror or exc})") from None
    try:
        return _resolve_files(data, sidecar, inbox_fd)
    finally:
        os.close(inbox_fd)


def _resolve_files(data: dict, sidecar: Path, inbox_fd: int) -> JobFiles:
    def by_convention(role: str) -> Path:
        found = _by_convention(sidecar, role)
        if found is None:
            return sidecar.parent / f"{job_name(sidecar)}.{role}.jpg"
        check_input(inbox_fd, found.name, role)
        return found

    content = resolve_path(data["content"], "content", sidecar, inbox_fd) if "content" in data \
        else by_convention("content")
    style = data.get("style")
    styles: list[tuple[Path, float]] = []
    masks: list[Path | None] = []
    total = 1.0
    if style is None:
        styles = [(by_convention("style"), 1.0)]
    elif isinstance(style, str):
        styles = [(resolve_path(style, "style", sidecar, inbox_fd), 1.0)]
    elif isinstance(style, list) and style:
        if len(style) > MAX_STYLES:
            raise JobError(ErrorKind.INVALID_JOB_FILE, f"style: {len(style)} styles; a blend takes at most {MAX_STYLES}")
        for i, item in enumerate(style):
            key = f"style[{i}]"
            if isinstance(item, str):
                styles.append((resolve_path(item, key, sidecar, inbox_fd), 1.0))
                continue
            if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight", "mask"}:
                raise JobError(ErrorKind.INVALID_JOB_FILE, f"{key}: expected a file name or "
                               f"{{path: FILE, weight: NUMBER, mask: FILE}} (weight and mask optional), got {item!r}")
            try:
                weight = number(0, 1e6)(item.get("weight", 1.0), f"{key}.weight")
            except SchemaError as exc:
                raise JobError(ErrorKind.INVALID_JOB_FILE, str(exc)) from None
            styles.append((resolve_path(item["path"], f"{key}.path", sidecar, inbox_fd), weight))
            if "mask" in item:
                masks += [None] * (len(styles) - 1 - len(masks))
                masks.append(resolve_path(item["mask"], f"{key}.mask", sidecar, inbox_fd))
        total = sum(w for _, w in styles)
        if total <= 0:
            raise JobError(ErrorKind.INVALID_JOB_FILE, "style: the blend weights add up to 0")
        styles = [(p, w / total) for p, w in styles]  # what runs is what job.yaml records
    else:
        raise JobError(ErrorKind.INVALID_JOB_FILE, "style: expected a file name or a list of them (a style with a "
                       f"mask too: [{{path: a.jpg, mask: sky.png}}]), got {style!r}")
    init = None
    init_value = data.get("init")
    if isinstance(init_value, str) and init_value not in NAMED_INITS:
        init = resolve_path(init_value, "init", sidecar, inbox_fd)
    keep = resolve_path(data["keep"], "keep", sidecar, inbox_fd) if "keep" in data else None
    files = JobFiles(sidecar=sidecar, content=content, styles=styles, init=init, weight_sum=total, masks=masks,
                     keep=keep)
    files.missing = [p for p in files.inputs() if not _present(inbox_fd, sidecar.parent, p)]
    return files


def named_files(sidecar: Path, inbox: Path, max_bytes: int) -> list[Path]:
    """Each file a job file names that can be reached, one at a time: for a job refused for one
    of its files (another user's private folder), so that the others go to the quarantine with
    it instead of staying behind in the inbox, unexplained."""
    try:
        data = read_sidecar(sidecar, max_bytes)
        inbox_fd = safefs.open_inbox(inbox)
    except (JobError, OSError):
        return []
    style = data.get("style")
    named = [("content", data.get("content")), ("init", data.get("init")), ("keep", data.get("keep"))]
    for i, item in enumerate(style if isinstance(style, list) else [style]):
        named.append((f"style[{i}]", item.get("path") if isinstance(item, dict) else item))
        if isinstance(item, dict):
            named.append((f"style[{i}].mask", item.get("mask")))
    out = []
    try:
        for key, value in named:
            if not isinstance(value, str) or value in NAMED_INITS:
                continue
            try:
                path = resolve_path(value, key, sidecar, inbox_fd)
            except JobError:
                continue
            if _present(inbox_fd, inbox, path):
                out.append(path)
    finally:
        os.close(inbox_fd)
    return out


def _present(inbox_fd: int, inbox: Path, path: Path) -> bool:
    try:
        safefs.lstat(inbox_fd, safefs.relative(inbox, path))
        return True
    except FileNotFoundError:
        return False


#: Keys a sidecar may hold besides the job keys.
FILE_KEYS = ("content", "style", "keep")


def job_settings(data: dict, defaults: dict) -> dict:
    """The effective job keys: config defaults with the sidecar's own on top, validated. Every
    problem is named at once, an unknown key with the closest known one."""

    known = [*FILE_KEYS, *JOB_FIELDS]
    problems = [(str(k), unknown_key(str(k), known)) for k in data if k not in known]
    overrides = {k: v for k, v in data.items() if k in JOB_FIELDS}
    try:
        settings = merge(defaults, overrides)
    except SchemaError as exc:
        problems.extend(exc.problems)
    if problems:
        raise JobError(ErrorKind.INVALID_JOB_FILE, str(SchemaError("", "", problems)),
                       problems=SchemaError("", "", problems).lines())
    return settings


@dataclass
class ParsedJob:
    """A job file read and its keys checked, before its images are looked at."""

    data: dict
    files: JobFiles
    settings: dict
    #: the keys typed, once (nstd/job/spec.py)
    job: Job = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.job is None:
            self.job = Job.of(self.settings)


def parse_job(sidecar: Path, inbox: Path, defaults: dict, max_sidecar_bytes: int) -> ParsedJob:
    """Read a job file, resolve the files it names and check its keys: the first half of the one
    verdict the daemon (as soon as the file settles) and `nstd validate` both give."""
    data = read_sidecar(sidecar, max_sidecar_bytes)
    problems: list[str] = []
    files = None
    try:
        files = resolve_files(data, sidecar, inbox)
    except JobError as exc:
        if exc.kind is not ErrorKind.INVALID_JOB_FILE:
            raise  # a path outside the inbox is its own verdict
        problems.extend(exc.problems)
    try:
        settings = job_settings(data, defaults)
    except JobError as exc:
        problems.extend(exc.problems)
    if problems:
        if files is not None and files.missing:
            problems.append(f"not found: {waiting_for(files) or sidecar.name}")
        raise JobError(ErrorKind.INVALID_JOB_FILE, "; ".join(problems), problems=problems)
    assert files is not None
    return ParsedJob(data, files, settings)


def waiting_for(files: JobFiles) -> str:
    """'a.jpg, b.png': the inputs a job still waits for, as its dropper named them."""
    return ", ".join(f.name for f in files.missing if f != files.sidecar)
