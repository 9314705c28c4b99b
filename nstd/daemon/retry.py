"""`nstd retry NAME [key=value ...]`: a quarantined job's inputs back into the inbox as a new job.

The quarantine folder's error.yaml says where each of its files was dropped (`files:`). The
inputs move back to the top of the inbox (never into a sub-folder a user could have swapped for
a link), each under its own name or the next free one, and a new job file naming them, with the
old keys and the given overrides, is written last: it is the commit marker, as for any job. The
old job file, error.yaml and job.log stay behind in the folder, renamed `NAME.retried-<time>`
with a retried.yaml that says what went where; they are never taken for a job. Nothing is
deleted, and the daemon need not run (or stop): it takes the new job like any other.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from nstd.daemon import safefs
from nstd.daemon.cancel import NoSuchJob
from nstd.daemon.jobfile import SIDECAR_SUFFIXES, job_settings, read_sidecar
from nstd.daemon.store import NSTD_FILES, Folders
from nstd.daemon.transfer import free_name_in
from nstd.errors import JobError, NstdError
from nstd.fsutil import atomic_write_text

RETRIED = ".retried-"


class RetryError(NstdError):
    """The job cannot be put back as asked (exit 2); nothing was moved."""


@dataclass
class Retried:
    sidecar: str  # the new job file's name in the inbox
    moved: dict[str, str]  # file in quarantine -> its name in the inbox
    kept: Path  # the quarantine folder, renamed, with error.yaml and job.log


def parse_overrides(pairs: list[str]) -> dict:
    """`steps=100 gif.every=2` -> {"steps": 100, "gif": {"every": 2}}; values read as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise RetryError(f"{pair!r}: expected key=value, e.g. steps=500")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RetryError(f"{pair!r}: {part} is given both as a value and as a section")
        node[leaf] = value
    return out


def retry(cfg: dict, name: str, overrides: dict) -> Retried:
    folders = Folders.from_config(cfg)
    if not name or "/" in name or name in (".", "..") or name.startswith(".") or RETRIED in name:
        raise NoSuchJob(f"{name!r}: give the name of a folder in the quarantine ({folders.quarantine})")
    try:
        parent_fd = os.open(folders.quarantine, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NstdError(f"the quarantine {folders.quarantine} cannot be read ({exc.strerror or exc})") from None
    try:
        try:
            qfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except FileNotFoundError:
            raise NoSuchJob(f"no quarantined job {name!r} in {folders.quarantine}") from None
        except OSError as exc:
            raise NoSuchJob(f"{name!r} in {folders.quarantine} is not a quarantined job's folder "
                            f"({exc.strerror or exc})") from None
        try:
            return _retry(folders, name, parent_fd, qfd, overrides, cfg)
        finally:
            os.close(qfd)
    finally:
        os.close(parent_fd)


def _retry(folders: Folders, name: str, parent_fd: int, qfd: int, overrides: dict, cfg: dict) -> Retried:
    folder = folders.quarantine / name
    error = _error_record(folder)
    origins = _origins(qfd, error)
    job = str(error.get("job") or name)
    sidecar_here = next((f for f, o in origins.items() if "/" not in o and o.lower().endswith(SIDECAR_SUFFIXES)
                         and o.rsplit(".", 1)[0] == job), None) \
        or next((f for f, o in origins.items() if "/" not in o and o.lower().endswith(SIDECAR_SUFFIXES)), None)
    if sidecar_here is None:
        raise RetryError(f"quarantine/{name} holds no job file; nothing to retry")
    try:
        data = read_sidecar(folder / sidecar_here, cfg["limits"]["max_sidecar_bytes"])
    except JobError as exc:
        raise RetryError(f"quarantine/{name}/{sidecar_here}: {exc.message}; fix the job file there, "
                         "then run nstd retry again") from None
    data = _merge(data, overrides)
    try:
        job_settings(data, cfg["defaults"])  # the new job's keys, checked before anything moves
    except JobError as exc:
        raise RetryError(f"the retried job would be invalid: {exc.message}") from None

    inbox_fd = safefs.open_inbox(folders.inbox)
    try:
        new_job = _free_job_name(inbox_fd, job)
        moved: dict[str, str] = {}
        for here, origin in origins.items():
            if here != sidecar_here:
                moved[here] = _move_out(qfd, here, inbox_fd, _free_file_name(inbox_fd, PurePosixPath(origin).name))
        new_data = _renamed(data, {origins[h]: n for h, n in moved.items()}, job)
        sidecar_name = f"{new_job}.yaml"
        _write_new(inbox_fd, sidecar_name, yaml.safe_dump(new_data, sort_keys=False, allow_unicode=True))
        os.fsync(inbox_fd)
    finally:
        os.close(inbox_fd)
    record = {"retried_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "as": sidecar_name,
              "overrides": overrides, "moved": moved}
    atomic_write_text(folder / "retried.yaml", yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    kept = free_name_in(parent_fd, f"{name}{RETRIED}{time.strftime('%Y%m%d-%H%M%S')}")
    safefs.rename_noreplace(parent_fd, name, parent_fd, kept)
    return Retried(sidecar_name, moved, folders.quarantine / kept)


def _error_record(folder: Path) -> dict:
    try:
        error = yaml.safe_load((folder / "error.yaml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RetryError(f"{folder}/error.yaml cannot be read ({exc}); put the files back by hand") from None
    return error if isinstance(error, dict) else {}


def _origins(qfd: int, error: dict) -> dict[str, str]:
    """Each user file in the folder -> where it was dropped (relative to the inbox). Folders from
    before error.yaml listed them: each file's own name. Only regular files count, never links."""
    listed = error.get("files") if isinstance(error.get("files"), dict) else None
    names = [n for n in os.listdir(qfd) if n not in NSTD_FILES and not n.startswith(".")]
    out = {}
    for n in sorted(names):
        st = os.stat(n, dir_fd=qfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            continue
        origin = str(listed.get(n, n)) if listed is not None else n
        out[n] = origin
    return out


def _merge(data: dict, overrides: dict) -> dict:
    out = dict(data)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _renamed(data: dict, new_names: dict[str, str], old_job: str) -> dict:
    """The job file's keys with every input named as it is now in the inbox; a job that named its
    images by convention (`<job>.content.jpg`) names them explicitly, since its name may change.
    A name not in `new_names` (a file left in the inbox) is kept as written."""
    def new(value):
        return new_names.get(str(PurePosixPath(value)), value) if isinstance(value, str) else value

    out = dict(data)
    for role in ("content", "style"):
        if role in out:
            continue
        found = sorted(n for o, n in new_names.items() if "/" not in o and o.startswith(f"{old_job}.{role}."))
        if found:
            out[role] = found[0]
    if "content" in data:
        out["content"] = new(data["content"])
    style = data.get("style")
    if isinstance(style, list):
        out["style"] = [{**s, "path": new(s.get("path"))} if isinstance(s, dict) else new(s) for s in style]
    elif style is not None:
        out["style"] = new(style)
    if isinstance(data.get("init"), str) and data["init"] not in ("content", "noise"):
        out["init"] = new(data["init"])
    return out


def _free_job_name(inbox_fd: int, job: str) -> str:
    """`job`, else `job-retry-2`, ...: no job file of that name in the inbox."""
    candidate, n = job, 1
    while any(_taken(inbox_fd, candidate + s) for s in SIDECAR_SUFFIXES):
        n += 1
        candidate = f"{job}-retry-{n}"
    return candidate


def _free_file_name(inbox_fd: int, name: str) -> str:
    """`a.jpg`, else `a-2.jpg`, ...: a free name at the top of the inbox, its suffix kept."""
    p = PurePosixPath(name)
    candidate, n = name, 1
    while _taken(inbox_fd, candidate):
        n += 1
        candidate = f"{p.stem}-{n}{p.suffix}"
    return candidate


def _taken(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _move_out(src_fd: int, name: str, dst_fd: int, new: str) -> str:
    """Move one file between two folders by descriptor, replacing nothing; across filesystems
    through a hidden name (which the daemon ignores), flushed first."""
    try:
        safefs.rename_noreplace(src_fd, name, dst_fd, new)
        return new
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    with os.fdopen(fd, "rb") as src:
        _write_new(dst_fd, new, src)
    os.unlink(name, dir_fd=src_fd)
    return new


def _write_new(dir_fd: int, name: str, content) -> None:
    """`content` (text, or a file to copy) as `name` in `dir_fd`: a hidden temporary name, flushed,
    then renamed into place, replacing nothing."""
    tmp = free_name_in(dir_fd, f".nstd-retry-{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, str):
                out.write(content.encode("utf-8", "surrogateescape"))
            else:
                while chunk := content.read(1 << 20):
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        safefs.rename_noreplace(dir_fd, tmp, dir_fd, name)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
