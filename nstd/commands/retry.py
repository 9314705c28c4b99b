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

import argparse
import fcntl
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nstd import yamltext
from nstd.commands.base import config_of, one_line
from nstd.daemon.inbox import is_ignored
from nstd.engine.images import ImageError, open_image
from nstd.engine.options import NAMED_INITS
from nstd.errors import ExitCode, JobError, NstdError
from nstd.job import overrides as job_overrides
from nstd.job.check import check_job, over_limits
from nstd.job.file import SIDECAR_SUFFIXES, ParsedJob, job_settings, read_sidecar, resolve_files
from nstd.job.spec import Job
from nstd.state import safefs
from nstd.state.claim import NoSuchJob
from nstd.state.folders import Folders
from nstd.state.names import RETRIED, free_name, free_name_in, taken_in
from nstd.state.store import NSTD_FILES


class RetryError(NstdError):
    """The job cannot be put back as asked (exit 2); nothing was moved."""


@dataclass
class Retried:
    sidecar: str  # the new job file's name in the inbox
    moved: dict[str, str]  # file in quarantine -> its name in the inbox
    kept: Path  # the quarantine folder, renamed, with error.yaml and job.log
    waits_for: list[str]  # inputs the new job names that are not in the inbox (yet)


def retry(cfg: dict, name: str, overrides: dict) -> Retried:
    folders = Folders.from_config(cfg)
    name = name.rstrip("/")  # a shell's completion adds one
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
            try:  # one retry of a folder at a time; the kernel drops the lock however we end
                fcntl.flock(qfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RetryError(f"another nstd retry is putting {name!r} back right now") from None
            if taken_in(qfd)("retried.yaml"):
                raise NoSuchJob(f"{name!r} was retried already (see its retried.yaml)")
            return _retry(folders, name, parent_fd, qfd, overrides, cfg)
        finally:
            os.close(qfd)
    finally:
        os.close(parent_fd)


def _retry(folders: Folders, name: str, parent_fd: int, qfd: int, overrides: dict, cfg: dict) -> Retried:
    """Everything through descriptors of the folder (`qfd`) and the inbox: a folder renamed or
    swapped for a link meanwhile is never followed."""
    folder = folders.quarantine / name  # for messages only
    error = _read_mapping(qfd, folder, "error.yaml", missing_ok=True)
    origins = _origins(qfd, error)
    sidecar_here = next((f for f, o in origins.items() if o.lower().endswith(SIDECAR_SUFFIXES) and "/" not in o), None)
    if sidecar_here is None:
        raise RetryError(f"quarantine/{name} holds no job file (a regular .yaml file); nothing to retry")
    data = job_overrides.apply(_read_mapping(qfd, folder, sidecar_here, max_bytes=cfg["limits"]["max_sidecar_bytes"]), overrides)
    old_job = origins[sidecar_here].rsplit(".", 1)[0]  # what its images were named after, by convention
    inputs = {h: o for h, o in origins.items() if h != sidecar_here}
    planned = {h: _inbox_name(o, h) for h, o in inputs.items()}
    _check_new_job(_renamed(data, {o: planned[h] for h, o in inputs.items()}, old_job), cfg)  # nothing moved yet
    _check_images(qfd, folder, _renamed(data, {o: h for h, o in inputs.items()}, old_job), cfg)

    try:
        inbox_fd = safefs.open_inbox(folders.inbox)
    except OSError as exc:
        raise NstdError(f"the inbox {folders.inbox} cannot be opened ({exc.strerror or exc})") from None
    moved: dict[str, str] = {}
    # All or nothing: the folder is marked first (renamed; every step below goes through its
    # descriptor), and whatever fails after that puts back each file and the folder's name.
    kept = _kept_name(parent_fd, name)
    try:
        safefs.rename_noreplace(parent_fd, name, parent_fd, kept)
    except OSError as exc:
        os.close(inbox_fd)
        raise RetryError(f"quarantine/{name} cannot be marked as retried ({exc.strerror or exc}); nothing was moved") from None
    try:
        new_job = _free_job_name(inbox_fd, name)
        try:
            for here, base in planned.items():
                moved[here] = safefs.move_between(qfd, here, inbox_fd, free_name(base, taken_in(inbox_fd), keep_suffix=True))
            new_data = _renamed(data, {inputs[h]: n for h, n in moved.items()}, old_job)
            sidecar_name = f"{new_job}.yaml"
            record = {"retried_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "as": sidecar_name,
                      "overrides": job_overrides.shown(overrides), "moved": moved}
            safefs.write_new(qfd, "retried.yaml", yamltext.dump(record))
            try:
                safefs.write_new(inbox_fd, sidecar_name, yamltext.dump(new_data))
                os.fsync(inbox_fd)
            except BaseException:
                os.unlink("retried.yaml", dir_fd=qfd)
                raise
        except BaseException:
            _put_back(inbox_fd, qfd, moved)
            safefs.rename_noreplace(parent_fd, kept, parent_fd, name)
            raise
    finally:
        os.close(inbox_fd)
    return Retried(sidecar_name, moved, folders.quarantine / kept, _waits_for(folders.inbox, new_data))


def _kept_name(parent_fd: int, name: str) -> str:
    """`NAME.retried-<time>`, free in the quarantine, within a file name's 255 bytes: a long NAME is
    cut (at a character) to make room."""
    stamp = f"{RETRIED}{time.strftime('%Y%m%d-%H%M%S')}"
    room = 255 - len(stamp.encode()) - 8  # free_name_in may add a short suffix
    base = name.encode()[:room].decode("utf-8", "ignore")
    return free_name_in(parent_fd, base + stamp)


#: error.yaml is nstd's, but it lies in a folder others may write: read it like a job file.
MAX_ERROR_BYTES = 1 << 20


def _read_mapping(qfd: int, folder: Path, name: str, max_bytes: int = MAX_ERROR_BYTES,
                  missing_ok: bool = False) -> dict:
    """A YAML mapping from the folder, read as a job file is: through the descriptor, no link
    followed, regular files only, a size cap, no aliases."""
    if missing_ok and not taken_in(qfd)(name):
        return {}
    try:
        return read_sidecar(folder / name, max_bytes, dir_fd=qfd,
                            limit_name="limits.max_sidecar_bytes" if max_bytes != MAX_ERROR_BYTES else "nstd's cap on error.yaml")
    except JobError as exc:
        raise RetryError(f"quarantine/{folder.name}/{name}: {exc.message}; fix it there, then run nstd retry again") from None


def _origins(qfd: int, error: dict) -> dict[str, str]:
    """Each user file in the folder -> where it was dropped (relative to the inbox). Folders from
    before error.yaml listed them: each file's own name. Only regular files count, never links."""
    listed = error.get("files") if isinstance(error.get("files"), dict) else None
    out = {}
    for n in sorted(os.listdir(qfd)):
        if n in NSTD_FILES or n.startswith("."):
            continue
        st = os.stat(n, dir_fd=qfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            continue
        origin = listed.get(n, n) if listed is not None else n
        out[n] = origin if isinstance(origin, str) and origin else n
    return out


def _inbox_name(origin: str, here: str) -> str:
    """The name an input gets at the top of the inbox: the one it was dropped with, unless that
    would be ignored (hidden, a temporary name) or taken for a job file; then its name here."""
    for candidate in (PurePosixPath(origin).name, here):
        if (candidate and candidate not in (".", "..") and "/" not in candidate and not is_ignored(candidate)
                and not candidate.lower().endswith(SIDECAR_SUFFIXES)):
            return candidate
    return "input" + (PurePosixPath(here).suffix if not here.lower().endswith(SIDECAR_SUFFIXES) else ".bin")


def _check_new_job(data: dict, cfg: dict) -> None:
    """The new job file's keys and file names, checked as the daemon will (in an empty folder:
    names are judged, files not looked for), before a file moves."""
    problems = []
    for check in (lambda: job_settings(data, cfg["defaults"]), lambda: _names_check(data)):
        try:
            check()
        except JobError as exc:
            problems.extend(exc.problems)
    if not problems:  # the static limits (the pixels wait for the content's size, at intake)
        problems = over_limits(Job.of(job_settings(data, cfg["defaults"])), cfg["limits"])
    if problems:
        raise RetryError(f"the retried job would be refused: {'; '.join(problems)} (override a key with "
                         "key=value, take one out with key=, or edit the job file in the quarantine folder)")


def _check_images(qfd: int, folder: Path, data: dict, cfg: dict) -> None:
    """The images the retried job names that are in the quarantine folder, checked as the intake
    will (each decoded, the network's smallest picture, the pixel limit) with its new keys,
    before a file moves: a retry whose content (with `size=64`, say) the intake would refuse
    at once is refused here. Files still to come are the inbox's to wait for."""
    from dataclasses import replace

    try:
        files = resolve_files(data, folder / "job.yaml", folder)
    except JobError:
        return  # _check_new_job has judged the names

    pins: dict[Path, safefs.Pinned] = {}
    coming = [p for p in files.missing if p != files.sidecar]  # the sidecar here is a stand-in
    problems: list[str] = []
    try:
        for path in files.inputs()[:-1]:
            if path not in files.missing and path not in pins:
                pins[path] = safefs.pin(qfd, folder, str(path.relative_to(folder)))
        if coming:  # what is here must decode; the job as a whole is judged when all has come
            for path, pinned in pins.items():
                try:
                    with pinned.reader() as fh:
                        open_image(path, cfg["limits"]["max_pixels"], fileobj=fh)
                except ImageError as exc:
                    problems.append(str(exc))
        else:
            check_job(ParsedJob(data, replace(files, missing=[]), job_settings(data, cfg["defaults"])),
                      cfg["limits"], pins)
    except (safefs.Refused, OSError) as exc:
        raise RetryError(f"the retried job's files cannot be read in the quarantine folder ({exc}); nothing was moved") from None
    except JobError as exc:
        problems = list(exc.problems or [exc.message])
    finally:
        for pinned in pins.values():
            pinned.close()
    if problems:
        raise RetryError(f"the retried job would be refused: {'; '.join(problems)}; nothing was moved")


def _names_check(data: dict) -> None:
    with tempfile.TemporaryDirectory() as empty:
        resolve_files(data, Path(empty) / "job.yaml", Path(empty))


def _waits_for(inbox: Path, data: dict) -> list[str]:
    """The files the new job names that the inbox does not hold: it will wait for them."""
    try:
        files = resolve_files(data, inbox / "retry.yaml", inbox)
    except JobError:
        return []
    return [str(p.relative_to(inbox)) for p in files.missing if p.name != "retry.yaml"]


def _put_back(inbox_fd: int, qfd: int, moved: dict[str, str]) -> None:
    """A retry that failed half-way: the inputs already moved go back where they were."""
    for here, there in moved.items():
        try:
            safefs.move_between(inbox_fd, there, qfd, here)
        except OSError:
            pass  # left in the inbox under `there`, never lost


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
        out["style"] = [{**s, "path": new(s.get("path")), **({"mask": new(s["mask"])} if "mask" in s else {})}
                        if isinstance(s, dict) else new(s) for s in style]
    elif style is not None:
        out["style"] = new(style)
    if isinstance(data.get("init"), str) and data["init"] not in NAMED_INITS:
        out["init"] = new(data["init"])
    if "keep" in data:
        out["keep"] = new(data["keep"])
    return out


def _free_job_name(inbox_fd: int, job: str) -> str:
    """`job`, else `job-retry-2`, ...: no job file of that name in the inbox; a name too long for
    `-retry-N.yaml` within a file name's 255 bytes is cut (at a character)."""
    job = job.encode()[:255 - len("-retry-9999.yaml")].decode("utf-8", "ignore")
    taken = taken_in(inbox_fd)
    return free_name(job, lambda c: any(taken(c + s) for s in SIDECAR_SUFFIXES), mark="retry-")


def main(args: argparse.Namespace) -> int:
    cfg = config_of(args, required=True)
    try:
        done = retry(cfg, args.name, job_overrides.parse(args.overrides))
    except OSError as exc:  # the folders themselves: permissions, a full disk
        raise NstdError(f"retry {args.name}: {exc.strerror or exc} ({exc.filename or 'a folder'})") from None
    if args.json:
        print(json.dumps({"retried": args.name, "sidecar": done.sidecar, "moved": done.moved, "kept": str(done.kept),
                          "waits_for": done.waits_for}, indent=1))
        return ExitCode.OK
    print(one_line(f"retrying {args.name} as {done.sidecar} in the inbox ({len(done.moved)} input(s) moved back); "
                   f"error.yaml and job.log kept in {done.kept}"))
    if done.waits_for:
        print(one_line(f"note: the job waits for {', '.join(done.waits_for)}: put them into the inbox "
                       f"(within watch.missing_timeout, or it is quarantined as missing input)"))
    return ExitCode.OK
