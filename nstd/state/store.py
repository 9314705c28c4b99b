"""Where a job's files are: inbox -> state (claimed) -> outbox or quarantine, crash-safe.

Every move between folders is a Transfer (nstd/state/transfer.py): after kill -9 or power loss
`recover()` rolls leftovers back, so each job is in exactly one of inbox, state, outbox or
quarantine, and no user file is ever deleted. The store also owns the layout of a job's state
folder: its record, its inputs, its log and its checkpoint. Keep state/, outbox/ and quarantine/
on one filesystem for atomic renames.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loguru import logger

from nstd import yamltext
from nstd.fsutil import atomic_write_bytes, atomic_write_text
from nstd.state import safefs
from nstd.state.claim import Claim, Input, JobFiles, StyleInput, Times
from nstd.state.folders import Folders
from nstd.state.names import free_name, free_name_in
from nstd.state.safefs import Pinned
from nstd.state.transfer import MANIFEST, TMP_PREFIX, Transfer, rollback, safe_component, tag_of, transfers

#: The files nstd writes into a quarantined job's folder (error.yaml's `files:` names the user's,
#: each with where it was dropped, relative to the inbox: what `nstd retry` puts back).
NSTD_FILES = ("error.yaml", "job.log", MANIFEST, "retried.yaml")
#: Why an input was copied, not moved (Transfer.left).
LEFT_WHY = "its folder is not the service's to write (another user's folder)"
#: A dead worker's transfer being rolled back: `.nstd-tx-reclaim-<job id>-<random>`.
RECLAIM = "reclaim-"


class Store:
    def __init__(self, folders: Folders):
        self.f = folders

    @property
    def inbox(self) -> Path:
        return self.f.inbox

    @property
    def outbox(self) -> Path:
        return self.f.outbox

    @property
    def jobs(self) -> Path:
        return self.f.jobs

    def fence(self) -> None:
        """Before each move of a claimed job's files: raises when this process may no longer
        move them (a cluster worker that lost its lease); nothing to check on one machine."""

    def move_tag(self, job: Claim) -> str:
        """The name of a claimed job's delivery or quarantine folder while it is being filled."""
        return job.id

    @contextmanager
    def _transfer(self, parent: Path, tag: str, fence=None) -> Iterator[Transfer]:
        """A Transfer that is rolled back at once if anything fails (a full disk, say)."""
        t = Transfer(parent, tag, fence)
        try:
            yield t
        except BaseException:
            try:
                rollback(t.root)
            except Exception as exc:  # recovery at the next start will try again
                logger.error("could not roll back {}: {}", t.root, exc)
            raise

    # ------------------------------------------------------------------ start-up

    def recover(self, cluster: bool = False) -> list[Claim]:
        """Roll back unfinished transfers, drop delivered state folders; return the claimed jobs.

        `cluster` (queue.backend celery): only this process's own unfinished moves are rolled back
        (claims, and quarantines straight from the inbox, tagged with no job id); a job's delivery
        or quarantine belongs to the worker leasing it, which may be making it right now, and is
        rolled back by the next worker to lease the job if its maker died."""
        for parent in (self.f.jobs, self.f.outbox, self.f.quarantine):
            for tmp in transfers(parent):
                if cluster and (parent == self.f.outbox or (parent == self.f.quarantine and _job_tag(tmp))):
                    continue
                try:
                    n = rollback(tmp)
                    logger.warning("recovered an interrupted transfer {} ({} file(s) put back)", tmp.name, n)
                except Exception as exc:  # never lose files to a recovery bug: leave it for a person
                    logger.error("could not roll back {}: {}", tmp, exc)
        if cluster:
            return []
        claimed = []
        for d in sorted(self.f.jobs.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            has_inputs = (d / "inputs").is_dir() and any((d / "inputs").iterdir())
            if not has_inputs:
                shutil.rmtree(d)  # delivered: only nstd's own files were left
                continue
            try:
                claimed.append(Claim.from_folder(d))
            except (OSError, ValueError, KeyError, TypeError):
                logger.error("state folder {} has inputs but no readable claim record; left for a person", d)
        return claimed

    # ------------------------------------------------------------------ transitions

    @contextmanager
    def pinned(self, paths: list[Path]) -> Iterator[dict[Path, Pinned]]:
        """Every path pinned (safefs): opened inside the inbox without following a link, regular
        files only. Raises safefs.Refused, FileNotFoundError or PermissionError for the first
        that cannot be; all are closed on leaving."""
        pins: dict[Path, Pinned] = {}
        fd = safefs.open_inbox(self.f.inbox)
        try:
            for p in paths:
                if p not in pins:
                    pins[p] = safefs.pin(fd, self.f.inbox, safefs.relative(self.f.inbox, p))
            yield pins
        finally:
            os.close(fd)
            for pin in pins.values():
                pin.close()

    def claim(self, name: str, files: JobFiles, shared: set[Path], settings: dict,
              pins: dict[Path, Pinned] | None = None, first_seen: float | None = None,
              arrived: float | None = None, left: list[str] | None = None) -> Claim:
        """Move a ready job's pinned files out of the inbox into state/jobs/<id>/inputs.

        Files in `shared` (named by other waiting sidecars) are copied instead and stay in the
        inbox. Inputs keep the name they were dropped with; the sidecar moves last. Without
        `pins` (the ones intake checked) the files are pinned here.
        """
        if pins is None:
            with self.pinned(files.inputs()) as pins:
                return self.claim(name, files, shared, settings, pins, first_seen, arrived, left)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        with self._transfer(self.f.jobs, job_id) as t:
            moved: dict[Path, str] = {}
            for src in files.inputs():  # unique, sidecar last
                base, n, candidate = Path(src.name), 1, src.name
                while candidate in moved.values():
                    n += 1
                    candidate = f"{base.stem}-{n}{base.suffix}"
                t.put_pinned(pins[src], f"inputs/{candidate}", copy=src in shared)
                moved[src] = candidate

            def inp(path: Path) -> Input:
                return Input(moved[path], str(path.relative_to(self.f.inbox)))

            claim = Claim(
                id=job_id, name=name, content=inp(files.content),
                styles=[StyleInput(**vars(inp(p)), weight=w, mask=inp(m) if (m := files.mask(i)) else None)
                        for i, (p, w) in enumerate(files.styles)],
                sidecar=inp(files.sidecar), init=inp(files.init) if files.init else None,
                keep=inp(files.keep) if files.keep else None, settings=settings,
                times=Times(first_seen=first_seen or now, arrived=arrived or now, claimed=now), folder=t.dir,
            )
            claim.save()  # into the transfer folder: claim.folder is it until the commit
            claim.folder = t.commit(self.f.jobs / job_id)
        if left is not None:
            left.extend(t.left)
        return claim

    def quarantine_from_inbox(self, name: str, sidecar: Path, files: list[Path], shared: set[Path], error: dict,
                              log: str) -> Path:
        """A job judged in the inbox: its regular files go to quarantine/<name>/. Files in `shared`
        (named by other waiting jobs) stay in the inbox for them: copying them into every failed
        job's folder would let one dropped file fill the disk. What is not a regular file (a
        link, a FIFO) is never moved: an input stays where it is; a job file is renamed
        `.nstd-refused-<name>` in the inbox, so it is not judged again. job.log says which."""
        fd = safefs.open_inbox(self.f.inbox)
        try:
            with self._transfer(self.f.quarantine, uuid.uuid4().hex[:12]) as t:
                used = set(NSTD_FILES)  # a user file never takes these names
                notes = []
                where_from: dict[str, str] = {}
                for src in dict.fromkeys([*files, sidecar]):
                    rel = safefs.relative(self.f.inbox, src)
                    if src in shared:
                        notes.append(f"{rel}: named by another waiting job; left in the inbox for it\n")
                        continue
                    try:
                        pin = safefs.pin(fd, self.f.inbox, rel)
                    except FileNotFoundError:
                        continue
                    except (safefs.Refused, OSError, UnicodeEncodeError) as exc:
                        notes.append(_leave(fd, rel, exc, is_sidecar=src == sidecar))
                        continue
                    try:
                        here = free_name(src.name, used.__contains__, keep_suffix=True)
                        used.add(here)
                        t.put_pinned(pin, here)
                        where_from[here] = rel
                        if t.left and t.left[-1] == rel:
                            notes.append(f"{rel}: {LEFT_WHY}; copied here, the file stays in the inbox\n")
                    except safefs.Refused as exc:  # swapped while being moved: put back, left there
                        notes.append(_leave(fd, rel, exc, is_sidecar=False))
                    finally:
                        pin.close()
                _write_error(t.dir, {**error, "files": where_from}, log + "".join(notes))
                return t.commit(self.f.quarantine / safe_component(name))
        finally:
            os.close(fd)

    def quarantine_claimed(self, job: Claim, error: dict, log: str) -> Path:
        origins = {i.file: i.origin for i in job.records()}
        with self._transfer(self.f.quarantine, self.move_tag(job), self.fence) as t:
            used = set(NSTD_FILES)  # a user file never takes these names
            where_from: dict[str, str] = {}
            for p in sorted(job.inputs_dir.iterdir()):
                here = free_name(p.name, used.__contains__, keep_suffix=True)
                used.add(here)
                t.put(p, here)
                where_from[here] = origins.get(p.name, p.name)
            _write_error(t.dir, {**error, "files": where_from}, log)
            final = t.commit(self.f.quarantine / safe_component(job.name))
        drop_state_folder(job.folder)
        return final

    def deliver(self, job: Claim, outputs: dict[str, bytes]) -> Path:
        """Write the results, move the inputs beside them, and rename outbox/<name> into place."""
        with self._transfer(self.f.outbox, self.move_tag(job), self.fence) as t:
            for rel, data in outputs.items():
                atomic_write_bytes(t.dir / rel, data, parents=False)
            for p in sorted(job.inputs_dir.iterdir()):
                t.put(p, f"inputs/{p.name}")
            final = t.commit(self.f.outbox / safe_component(job.name))
        drop_state_folder(job.folder)
        return final

    def reclaim(self, job_id: str) -> int:
        """A claimed job's unfinished deliveries or quarantines by workers that died or stalled:
        put their files back into the job's state folder; returns how many. Call it only while
        holding the job's lease. Each such folder is first renamed (one atomic step), so a
        stalled maker that wakes up can add nothing to it; the rollback's first step takes its
        payload under the lock a commit needs, so of that maker's commit and this rollback exactly
        one gets the files, all of them (each lease's transfers have names of their own, so it
        cannot take this holder's either)."""
        restored = 0
        for parent in (self.f.outbox, self.f.quarantine):
            for tmp in transfers(parent, job_id):
                taken = parent / f"{TMP_PREFIX}{RECLAIM}{job_id}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(tmp, taken)
                except FileNotFoundError:
                    continue  # committed and cleaned up by its maker: the job is delivered
                restored += rollback(taken)
            for tmp in transfers(parent, f"{RECLAIM}{job_id}-"):
                restored += rollback(tmp)  # a reclaimer that died on the way
        return restored

    # ------------------------------------------------------------------ checkpoints

    @property
    def kept(self) -> Path:
        """`state/kept/<key>/`: checkpoints of jobs stopped over limits.max_job_seconds (checkpoints.keep)."""
        return self.f.state / "kept"

    @staticmethod
    def checkpoint_dir(job: Claim) -> Path:
        """`state/jobs/<id>/checkpoint/`: checkpoint.pt and frames/NNNNN.png (see checkpoints.py)."""
        return job.folder / "checkpoint"


def _job_tag(tmp: Path) -> bool:
    """A transfer named after a claimed job's id (YYYYmmdd-HHMMSS-xxxxxxxx), or one being
    reclaimed from a dead worker, not a quarantine straight from the inbox (12 hex digits)."""
    tag = tag_of(tmp)
    return tag.startswith(RECLAIM) or (len(tag) >= 24 and tag[8] == "-" and tag[15] == "-")


def _leave(inbox_fd: int, rel: str, exc: Exception, is_sidecar: bool) -> str:
    """A file of a quarantined job that is not a regular file: left in the inbox; a job file is
    renamed aside (never deleted, never followed). Returns the line for job.log."""
    why = exc.reason if isinstance(exc, safefs.Refused) else (getattr(exc, "strerror", None) or str(exc))
    if is_sidecar and "/" not in rel:
        short = ".nstd-refused-" + hashlib.sha256(os.fsencode(rel)).hexdigest()[:16] + ".yaml"
        for aside in (f".nstd-refused-{rel}", short):  # a long name may not take the prefix
            try:
                aside = free_name_in(inbox_fd, aside)
                # one atomic move of whatever the name holds now, replacing nothing: an entry
                # swapped in meanwhile is moved aside, never deleted
                safefs.rename_noreplace(inbox_fd, rel, inbox_fd, aside)
                return f"{rel}: {why}; left in the inbox as {aside}\n"
            except OSError as exc2:
                failed = exc2
        return f"{rel}: {why}; left in the inbox (could not be renamed aside: {failed.strerror or failed})\n"
    return f"{rel}: {why}; left in the inbox\n"


def _write_error(folder: Path, error: dict, log: str) -> None:
    atomic_write_text(folder / "error.yaml", yamltext.dump(error), parents=False)
    atomic_write_text(folder / "job.log", log, parents=False)


def drop_state_folder(folder: Path) -> None:
    """After a delivery or quarantine: the job's state folder goes, but never a user's file. One
    still in inputs/ (put back meanwhile by a worker that took over the job) keeps the folder."""
    inputs = folder / "inputs"
    try:
        left = os.listdir(inputs)
    except FileNotFoundError:
        left = []
    except OSError as exc:
        logger.error("cannot read {} ({}); the state folder is kept", inputs, exc)
        return
    if left:
        logger.error("{} still holds {} input(s) after the job was moved; the state folder is kept", inputs, len(left))
        return
    shutil.rmtree(folder, ignore_errors=True)
