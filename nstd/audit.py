"""The folder invariants: after any run, crash or fault, is every dropped file accounted for?

`audit()` compares what was dropped with what the folders hold and returns a list of problems
(empty when all is well). Tests and the reliability bench share it.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from nstd.state.transfer import MANIFEST, is_transfer

OUTBOX_FILES = ("job.yaml", "report.json", "job.log")
QUARANTINE_FILES = ("error.yaml", "job.log")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime_ns) of every file below `folder`, to prove later it was not touched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = (digest(p), p.stat().st_mtime_ns)
    return out


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if (p.is_file() or p.is_symlink())] if folder.is_dir() else []


def audit(root: Path, dropped: dict[str, dict[str, str]], outside: dict[Path, dict] | None = None,
          settled: bool = True) -> list[str]:
    """Check the folders under `root` against the jobs that were dropped.

    `dropped` maps each job's sidecar name to {file name: sha256} of the files dropped for it (the
    sidecar included). `outside` maps folders outside the root to their earlier `snapshot()`.
    `settled`: the daemon has stopped (or recovered), so no temporary folder may be left.
    """
    problems: list[str] = []
    inbox, outbox, quarantine, jobs = root / "inbox", root / "outbox", root / "quarantine", root / "state" / "jobs"
    places = {
        "inbox": [p for p in inbox.iterdir() if p.is_file() or p.is_symlink()] if inbox.is_dir() else [],
        "state": [p for p in _files(jobs) if p.parent.name == "inputs"],
        "outbox": [p for p in _files(outbox) if p.parent.name == "inputs"],
        "quarantine": [p for p in _files(quarantine) if p.name not in QUARANTINE_FILES],
    }
    found: dict[tuple[str, str], list[str]] = {}
    for where, paths in places.items():
        for p in paths:
            if is_transfer(str(p)) or p.name == MANIFEST:
                continue
            try:
                key = (p.name, digest(p)) if not p.is_symlink() else (p.name, "link")
            except OSError:
                continue
            found.setdefault(key, []).append(f"{where}:{p.parent.name}")
    for sidecar, files in dropped.items():
        where = found.get((sidecar, files[sidecar]), [])
        renamed = [k for k in found if k[1] == files[sidecar] and k[0].endswith(sidecar) and k[0] != sidecar]
        where = where + [w for k in renamed for w in found[k]]
        if len(where) != 1:
            problems.append(f"job file {sidecar!r} is in {len(where)} places: {where}")
        for name, sha in files.items():
            if not any(k[1] == sha for k in found):  # copies of a shared style count too
                problems.append(f"{sidecar}: dropped file {name!r} is nowhere")
    for d in outbox.iterdir() if outbox.is_dir() else ():
        if is_transfer(d.name):
            if settled:
                problems.append(f"unfinished outbox folder left: {d.name}")
            continue
        missing = [f for f in OUTBOX_FILES if not (d / f).is_file()]
        results = [p for p in d.iterdir() if p.suffix in (".png", ".jpg", ".webp", ".tiff")]
        if missing or not results or not (d / "inputs").is_dir():
            problems.append(f"incomplete outbox folder {d.name}: missing {missing or 'result or inputs'}")
    for d in quarantine.iterdir() if quarantine.is_dir() else ():
        if is_transfer(d.name):
            if settled:
                problems.append(f"unfinished quarantine folder left: {d.name}")
            continue
        if not (d / "error.yaml").is_file():
            problems.append(f"quarantine folder {d.name} has no error.yaml")
    if settled and jobs.is_dir():
        problems += [f"unfinished claim left: {d.name}" for d in jobs.iterdir() if is_transfer(d.name)]
    for folder, before in (outside or {}).items():
        if snapshot(folder) != before:
            problems.append(f"{folder} outside the root was changed")
    return problems


def dropped_files(folder: Path, sidecar: str, names: list[str]) -> dict[str, str]:
    """{name: sha256} for a job about to be dropped from `folder` (helper for tests)."""
    return {n: digest(folder / n) for n in [*names, sidecar] if os.path.exists(folder / n)}


def audit_confinement(root: Path, outside: dict[Path, dict] | None = None) -> list[str]:
    """What an inbox user must never achieve: a link, FIFO, socket or device in state/, outbox/ or
    quarantine/, or a file from outside the inbox (any file in `outside`'s snapshots, by digest)
    among them; and `outside` itself changed (compared with its `snapshot()`)."""
    problems: list[str] = []
    foreign = {d: f"{folder}/{name}" for folder, snap in (outside or {}).items() for name, (d, _) in snap.items()}
    for sub in ("state", "outbox", "quarantine"):
        base = root / sub
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{p.relative_to(root)} is not a regular file (mode {oct(st.st_mode)})")
                continue
            d = digest(p)
            if d in foreign:
                problems.append(f"{p.relative_to(root)} is a copy of {foreign[d]}, from outside the inbox")
    for folder, before in (outside or {}).items():
        if snapshot(folder) != before:
            problems.append(f"{folder} changed")
    return problems
