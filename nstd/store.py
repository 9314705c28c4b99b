"""Where a job's files are: inbox -> state (claimed) -> outbox or quarantine, crash-safe.

Every transfer builds a hidden temporary folder beside its destination, writes a manifest there
first (which file came from where, moved or copied), moves or copies the files in, and only then
renames the folder into place. After kill -9 or power loss, `recover()` rolls every leftover
temporary folder back by its manifest, so each job is in exactly one of inbox, state, outbox or
quarantine, and no user file is ever deleted. Moves fall back to copy+fsync+unlink across
filesystems; keep state/, outbox/ and quarantine/ on one filesystem for atomic renames.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from loguru import logger

from nstd.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir

MANIFEST = ".nstd-manifest.json"
TMP_PREFIX = ".nstd-tmp-"
CLAIM_FILE = "claim.json"


@dataclass(frozen=True)
class Folders:
    inbox: Path
    outbox: Path
    quarantine: Path
    state: Path
    logs: Path

    @classmethod
    def from_config(cls, cfg: dict) -> "Folders":
        p = cfg["paths"]
        return cls(*(Path(p[k]) for k in ("inbox", "outbox", "quarantine", "state", "logs")))

    @property
    def jobs(self) -> Path:
        return self.state / "jobs"

    def check_layout(self) -> None:
        """Refuse folders nested in the inbox (or the inbox in them): jobs would feed on results."""
        inbox = Path(os.path.realpath(self.inbox))
        for name in ("outbox", "quarantine", "state", "logs"):
            other = Path(os.path.realpath(getattr(self, name)))
            if other == inbox or inbox in other.parents:
                raise ValueError(f"paths.{name} ({other}) lies inside the inbox ({inbox}); move it out")
            if other in inbox.parents:
                raise ValueError(f"the inbox ({inbox}) lies inside paths.{name} ({other}); move it out")

    def create(self) -> None:
        for d in (self.inbox, self.outbox, self.quarantine, self.jobs, self.logs):
            d.mkdir(parents=True, exist_ok=True)


def move_file(src: Path, dst: Path) -> None:
    """Rename, or copy+fsync+unlink across filesystems. `dst` must not exist."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_file(src, dst)
        os.unlink(src)


def copy_file(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst, follow_symlinks=True)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


def unique_name(parent: Path, name: str) -> Path:
    """`name`, else `name-2`, `name-3`, ...: never an existing entry."""
    candidate, n = parent / name, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


#: Bytes kept of a job name in the folder and file names nstd makes: room for "-NN", ".webp" and
#: a temporary name within the 255-byte limit of most filesystems.
NAME_BYTES = 180


def safe_component(name: str) -> str:
    """A job name usable in one folder or file name: printable, and at most NAME_BYTES of UTF-8."""
    cleaned = "".join(c if c.isprintable() and c not in "/\0" else "_" for c in name).strip() or "job"
    return cleaned.encode("utf-8")[:NAME_BYTES].decode("utf-8", "ignore")


class Transfer:
    """A temporary folder being filled; `commit()` renames it into place."""

    def __init__(self, parent: Path, tag: str):
        self.dir = parent / f"{TMP_PREFIX}{tag}"
        self.dir.mkdir(parents=True)
        self.entries: list[dict] = []

    def _save_manifest(self) -> None:
        atomic_write_text(self.dir / MANIFEST, json.dumps({"entries": self.entries}, indent=1))

    def put(self, src: Path, rel: str, copy: bool = False) -> Path:
        """Move (or copy) `src` to `rel` inside the folder, recording it in the manifest first."""
        dst = self.dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.entries.append({"from": str(src), "to": rel, "copy": copy})
        self._save_manifest()
        if copy:
            copy_file(src, dst)
        else:
            move_file(src, dst)
        return dst

    def commit(self, final: Path) -> Path:
        """Rename into place (as `final`, or `final-2`...) and drop the manifest."""
        fsync_dir(self.dir)
        target = unique_name(final.parent, final.name)
        os.rename(self.dir, target)
        fsync_dir(final.parent)
        try:
            os.unlink(target / MANIFEST)
        except FileNotFoundError:
            pass
        return target


def rollback(tmp: Path) -> int:
    """Undo an unfinished transfer: moved files go back where they came from; returns the count."""
    restored = 0
    try:
        entries = json.loads((tmp / MANIFEST).read_text())["entries"]
    except (OSError, ValueError, KeyError):
        entries = []
    for e in reversed(entries):
        here, origin = tmp / e["to"], Path(e["from"])
        if e.get("copy") or not (here.exists() or here.is_symlink()):
            continue
        origin.parent.mkdir(parents=True, exist_ok=True)
        if origin.exists() or origin.is_symlink():
            origin = unique_name(origin.parent, origin.name + ".restored")
        move_file(here, origin)
        restored += 1
    # Every user file was listed before it was moved in, and is back now: the rest is nstd's own.
    shutil.rmtree(tmp)
    return restored


@dataclass
class Claimed:
    """A job in state/: its folder, its claim record and its inputs."""

    dir: Path
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def inputs(self) -> Path:
        return self.dir / "inputs"

    @property
    def log_path(self) -> Path:
        """The job's own log, copied into the outbox or quarantine with it."""
        return self.dir / "job.log"

    def input(self, key: str) -> Path:
        return self.inputs / self.record["files"][key]

    def save(self) -> None:
        atomic_write_text(self.dir / CLAIM_FILE, json.dumps(self.record, indent=1))


class Store:
    def __init__(self, folders: Folders):
        self.f = folders

    @contextmanager
    def _transfer(self, parent: Path, tag: str) -> Iterator[Transfer]:
        """A Transfer that is rolled back at once if anything fails (a full disk, say)."""
        t = Transfer(parent, tag)
        try:
            yield t
        except BaseException:
            try:
                rollback(t.dir)
            except Exception as exc:  # recovery at the next start will try again
                logger.error("could not roll back {}: {}", t.dir, exc)
            raise

    # ------------------------------------------------------------------ start-up

    def recover(self) -> list[Claimed]:
        """Roll back unfinished transfers, drop delivered state folders; return the claimed jobs."""
        for parent in (self.f.jobs, self.f.outbox, self.f.quarantine):
            for tmp in sorted(parent.glob(f"{TMP_PREFIX}*")):
                try:
                    n = rollback(tmp)
                    logger.warning("recovered an interrupted transfer {} ({} file(s) put back)", tmp.name, n)
                except Exception as exc:  # never lose files to a recovery bug: leave it for a person
                    logger.error("could not roll back {}: {}", tmp, exc)
        claimed = []
        for d in sorted(self.f.jobs.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                record = json.loads((d / CLAIM_FILE).read_text())
            except (OSError, ValueError):
                record = None
            has_inputs = (d / "inputs").is_dir() and any((d / "inputs").iterdir())
            if not has_inputs:
                shutil.rmtree(d)  # delivered: only nstd's own files were left
                continue
            if record is None:
                logger.error("state folder {} has inputs but no readable claim record; left for a person", d)
                continue
            claimed.append(Claimed(d, record))
        return claimed

    # ------------------------------------------------------------------ transitions

    def claim(self, name: str, files: dict[str, Path], shared: set[Path], record: dict) -> Claimed:
        """Move a ready job's files out of the inbox into state/jobs/<id>/inputs.

        `files` maps roles (content, style0, init, sidecar) to inbox paths; files in `shared`
        (named by other waiting sidecars) are copied instead and stay in the inbox. The sidecar
        moves last.
        """
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        with self._transfer(self.f.jobs, job_id) as t:
            return self._claim_into(t, job_id, name, files, shared, record)

    def _claim_into(self, t: Transfer, job_id: str, name: str, files: dict[str, Path], shared: set[Path],
                    record: dict) -> Claimed:
        names: dict[str, str] = {}
        moved: dict[Path, str] = {}
        order = sorted(files.items(), key=lambda kv: kv[0] == "sidecar")
        for role, src in order:
            if src in moved:
                names[role] = moved[src]
                continue
            base = src.name  # inputs keep the name they were dropped with
            taken = set(moved.values())
            candidate, n = base, 1
            while candidate in taken:
                n += 1
                candidate = f"{Path(base).stem}-{n}{Path(base).suffix}"
            t.put(src, f"inputs/{candidate}", copy=src in shared)
            moved[src] = candidate
            names[role] = candidate
        record = {
            **record,
            "id": job_id,
            "name": name,
            "files": names,
            "attempts": 0,
            "claimed_at": time.time(),
            "origins": {v: str(k.relative_to(self.f.inbox)) for k, v in moved.items()},
        }
        atomic_write_text(t.dir / CLAIM_FILE, json.dumps(record, indent=1))
        final = t.commit(self.f.jobs / job_id)
        return Claimed(final, record)

    def quarantine_from_inbox(self, name: str, files: list[Path], shared: set[Path], error: dict, log: str) -> Path:
        """A job judged in the inbox: its files (copies of shared ones) go to quarantine/<name>/."""
        with self._transfer(self.f.quarantine, uuid.uuid4().hex[:12]) as t:
            used = {"error.yaml", "job.log"}
            for src in dict.fromkeys(files):
                if not (src.exists() or src.is_symlink()):
                    continue
                t.put(src, _free_name(src.name, used), copy=src in shared)
            _write_error(t.dir, error, log)
            return t.commit(self.f.quarantine / safe_component(name))

    def quarantine_claimed(self, job: Claimed, error: dict, log: str) -> Path:
        with self._transfer(self.f.quarantine, job.id) as t:
            used = {"error.yaml", "job.log"}
            for p in sorted(job.inputs.iterdir()):
                t.put(p, _free_name(p.name, used))
            _write_error(t.dir, error, log)
            final = t.commit(self.f.quarantine / safe_component(job.name))
        shutil.rmtree(job.dir, ignore_errors=True)
        return final

    def deliver(self, job: Claimed, outputs: dict[str, bytes]) -> Path:
        """Write the results, move the inputs beside them, and rename outbox/<name> into place."""
        with self._transfer(self.f.outbox, job.id) as t:
            for rel, data in outputs.items():
                atomic_write_bytes(t.dir / rel, data)
            for p in sorted(job.inputs.iterdir()):
                t.put(p, f"inputs/{p.name}")
            final = t.commit(self.f.outbox / safe_component(job.name))
        shutil.rmtree(job.dir, ignore_errors=True)
        return final


def _free_name(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"input-{n}-{name}"
    used.add(candidate)
    return candidate


def _write_error(folder: Path, error: dict, log: str) -> None:
    import yaml

    atomic_write_text(folder / "error.yaml", yaml.safe_dump(error, sort_keys=False, allow_unicode=True))
    atomic_write_text(folder / "job.log", log)
