"""Crash-safe transfers between folders: a hidden temporary folder, a manifest, one rename.

A transfer builds `.nstd-tmp-<tag>` beside its destination, writes a manifest there first (which
file came from where, moved or copied), moves or copies the files in, and only then renames the
folder into place. After kill -9 or power loss `rollback()` puts every moved file back by the
manifest, so no user file is ever lost. Moves fall back to copy+fsync+unlink across filesystems.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from nstd.fsutil import atomic_write_text, fsync_dir

MANIFEST = ".nstd-manifest.json"
TMP_PREFIX = ".nstd-tmp-"


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
