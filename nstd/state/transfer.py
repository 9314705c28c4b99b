"""Crash-safe transfers between folders: a hidden temporary folder, a manifest, one rename.

A transfer builds `.nstd-tx-<tag>/` beside its destination: a manifest (which file came from
where, moved or copied), written before each move, and the folder being filled, `payload/`. The
commit renames `payload/` into place, so the folder that appears holds what was put there and
nothing else (a reader never sees the manifest in it), then removes the rest. After kill -9 or
power loss `rollback()` puts every moved file back by the manifest, so no user file is ever lost;
it first renames `payload/` to `rolling-back/`, and a transfer with neither was committed. Moves
fall back to copy+fsync+unlink across filesystems.

Files from the inbox come pinned (safefs.Pinned): renamed through their folder's descriptor and
checked to be the inode that was pinned, or copied from the pinned descriptor itself, so what
lands is what was checked, never a link. The manifest records that inode: a rollback whose origin
still holds it knows the copy here is a spare (a copy cut short, across filesystems or by a full
disk) and leaves nothing behind; otherwise it puts the file back through the inbox's descriptor,
never through a link a user swapped in meanwhile.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from nstd.fsutil import atomic_write_text, fsync_dir
from nstd.state.names import unique_name
from nstd.state.safefs import Pinned, Refused, open_inbox, parts_of, rename_noreplace, write_new

MANIFEST = ".nstd-manifest.json"
TMP_PREFIX = ".nstd-tx-"
#: Transfers of nstd before payload/ (their files beside the manifest): still rolled back here.
#: The new name keeps an older nstd sharing the root (a cluster upgraded one machine at a time)
#: away from transfers it would misread: it rolls back only its own prefix, and would have
#: deleted the files it did not find beside the manifest.
LEGACY_PREFIX = ".nstd-tmp-"
PREFIXES = (TMP_PREFIX, LEGACY_PREFIX)
#: Inside a transfer: the folder being filled, and the name a rollback takes it under first.
PAYLOAD, ROLLING_BACK = "payload", "rolling-back"


def is_transfer(name: str) -> bool:
    """A folder (or a path inside one) that is an unfinished transfer of either layout."""
    return any(name.startswith(prefix) or f"/{prefix}" in name for prefix in PREFIXES)


def transfers(parent: Path, stem: str = "") -> list[Path]:
    """The unfinished transfers in `parent` whose tag starts with `stem`, of either layout."""
    return sorted(p for prefix in PREFIXES for p in parent.glob(glob.escape(prefix + stem) + "*"))


def tag_of(tmp: Path) -> str:
    """A transfer's tag: its name less the prefix."""
    return next(tmp.name[len(p):] for p in PREFIXES if tmp.name.startswith(p))


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


#: Bytes kept of a job name in the folder and file names nstd makes: room for "-NN", ".webp" and
#: a temporary name within the 255-byte limit of most filesystems.
NAME_BYTES = 180


def safe_component(name: str) -> str:
    """A job name usable in one folder or file name: printable, and at most NAME_BYTES of UTF-8."""
    cleaned = "".join(c if c.isprintable() and c not in "/\0" else "_" for c in name).strip() or "job"
    return cleaned.encode("utf-8")[:NAME_BYTES].decode("utf-8", "ignore")


class Transfer:
    """A temporary folder being filled (`dir`); `commit()` renames it into place."""

    def __init__(self, parent: Path, tag: str, fence: Callable[[], None] | None = None):
        """`fence` is called before every move and before the commit, and raises when this
        process may no longer move the job's files (a cluster worker's lease)."""
        self.root = parent / f"{TMP_PREFIX}{tag}"
        self.dir = self.root / PAYLOAD
        self.fence = fence or (lambda: None)
        self.fence()
        self.root.mkdir(parents=True)
        self.dir.mkdir()
        self.entries: list[dict] = []
        #: inbox files copied, not moved, because their folder is not the service's to write
        #: (another user's 755 folder): they stay where they were dropped, and the caller says so
        self.left: list[str] = []

    def _save_manifest(self) -> None:
        # Never made again once gone: a worker that took over a stalled one's transfer renamed it.
        atomic_write_text(self.root / MANIFEST, json.dumps({"payload": PAYLOAD, "entries": self.entries}, indent=1),
                          parents=False)

    def put_pinned(self, pin: Pinned, rel: str, copy: bool = False) -> Path:
        """Move (or copy) a pinned inbox file to `rel`; refuses (Refused) a name swapped since the pin."""
        dst = self._fresh(rel)
        self.entries.append({"from": str(pin.path), "to": rel, "copy": copy, "inbox": str(_inbox_of(pin)),
                             "rel": pin.rel, "inode": [pin.st.st_dev, pin.st.st_ino]})
        self._save_manifest()
        if copy:
            _copy_fd(pin.fd, dst)
            _unchanged(pin)
            return dst
        try:
            os.rename(pin.name, dst, src_dir_fd=pin.parent_fd)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM) and "/" in pin.rel:
                # A sub-folder the service may read but not write (another user's, mode 755):
                # the job takes a copy and the file stays, as a shared one does.
                self.entries[-1]["copy"] = True
                self._save_manifest()
                _copy_fd(pin.fd, dst)
                _unchanged(pin)
                self.left.append(pin.rel)
                return dst
            if exc.errno != errno.EXDEV:
                raise
            _copy_fd(pin.fd, dst)  # across filesystems: the pinned file's bytes, then its name
            _unchanged(pin)
            if pin.is_still_there():
                os.unlink(pin.name, dir_fd=pin.parent_fd)
            return dst
        st = os.stat(dst, follow_symlinks=False)
        same_file = (st.st_dev, st.st_ino) == (pin.st.st_dev, pin.st.st_ino)
        if not same_file or not _same_content(st, pin.st):
            # Not what was checked (swapped, or written to since): it goes back to the inbox,
            # replacing nothing, and only then leaves the manifest; if it cannot go back, the
            # rollback puts it back.
            place(dst, pin.parent_fd, pin.name)
            self.entries.pop()
            self._save_manifest()
            raise Refused(pin.rel, "was written to while the job was being claimed" if same_file else
                          "was replaced while the job was being claimed")
        return dst

    def _fresh(self, rel: str) -> Path:
        """`rel` inside the folder, which must not exist yet (a user's file named like the manifest
        must never overwrite it, nor anything else)."""
        if rel == MANIFEST:
            raise ValueError(f"{rel}: reserved for the manifest")
        dst = self.dir / rel
        for folder in reversed(dst.relative_to(self.dir).parents[:-1]):
            (self.dir / folder).mkdir(exist_ok=True)  # below the folder only: never the folder itself
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "already in the transfer", str(dst))
        return dst

    def put(self, src: Path, rel: str, copy: bool = False) -> Path:
        """Move (or copy) `src` to `rel` inside the folder, recording it in the manifest first."""
        self.fence()
        dst = self._fresh(rel)
        self.entries.append({"from": str(src), "to": rel, "copy": copy})
        self._save_manifest()
        if copy:
            copy_file(src, dst)
        else:
            move_file(src, dst)
        return dst

    def commit(self, final: Path) -> Path:
        """Rename the payload into place (as `final`, or `final-2`...), never over anything (another
        worker may be committing a job of the same name at this moment), then drop the manifest.

        The payload is named through the transfer's own folder at the moment of the rename, under
        the same lock as a rollback's first step (which renames it aside): of a stalled worker's
        commit and another worker's rollback, exactly one takes it."""
        fsync_dir(self.dir)
        self.fence()
        src_fd = os.open(self.root.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dst_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                while True:
                    target = unique_name(final.parent, final.name)
                    try:
                        rename_noreplace(src_fd, f"{self.root.name}/{PAYLOAD}", dst_fd, target.name)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        fsync_dir(final.parent)
        fsync_dir(self.root)
        shutil.rmtree(self.root, ignore_errors=True)  # the manifest alone: a recovery would find nothing to put back
        return target


def rollback(tmp: Path) -> int:
    """Undo an unfinished transfer: moved files go back where they came from; returns the count."""
    restored = 0
    try:
        manifest = json.loads((tmp / MANIFEST).read_text())
        entries = manifest["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        manifest, entries = {}, []
    base = tmp  # a transfer made before payload/ (its files beside the manifest)
    if isinstance(manifest, dict) and manifest.get("payload") == PAYLOAD:
        base = tmp / ROLLING_BACK
        try:  # first taken from under a commit (see Transfer.commit); already, by a rollback cut short
            os.rename(tmp / PAYLOAD, base)
        except FileNotFoundError:
            pass  # committed (nothing here to put back), or taken already
    for e in reversed(entries):
        here, origin = base / e["to"], Path(e["from"])
        if e.get("copy") or not (here.exists() or here.is_symlink()):
            continue
        if "inode" in e:
            restored += _restore_to_inbox(here, Path(e["inbox"]), e["rel"], tuple(e["inode"]))
            continue
        origin.parent.mkdir(parents=True, exist_ok=True)
        if origin.exists() or origin.is_symlink():
            origin = unique_name(origin.parent, origin.name + ".restored")
        move_file(here, origin)
        restored += 1
    # Every user file was listed before it was moved in, and is back now: the rest is nstd's own.
    shutil.rmtree(tmp)
    return restored


def _same_content(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def _unchanged(pin: Pinned) -> None:
    """After a copy: the pinned file must not have been written to since it was checked (a held
    descriptor could grow it past limits.max_input_bytes)."""
    if not _same_content(os.fstat(pin.fd), pin.st):
        raise Refused(pin.rel, "was written to while the job was being claimed")


def _inbox_of(pin: Pinned) -> Path:
    """The inbox folder a pinned file was reached from (its path minus its relative name)."""
    path = pin.path
    for _ in parts_of(pin.rel):
        path = path.parent
    return path


def _copy_fd(fd: int, dst: Path) -> None:
    """Copy the open file `fd` (from its start) to a new `dst`, flushed to disk."""
    with os.fdopen(os.dup(fd), "rb") as src, open(dst, "xb") as out:
        src.seek(0)
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def place(here: Path, dir_fd: int, name: str) -> str:
    """Move `here` into the folder `dir_fd` as `name`, or `name.restored`, `name.restored-2`...,
    replacing nothing, ever (renameat2 with RENAME_NOREPLACE). Across filesystems the bytes go
    through a hidden temporary name first. Returns the name used."""
    src_fd = os.open(here.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        n, across = 0, False
        while True:
            candidate = name if n == 0 else f"{name}.restored" if n == 1 else f"{name}.restored-{n}"
            try:
                if across:
                    with open(here, "rb") as src:
                        write_new(dir_fd, candidate, src, ".nstd-restoring")
                    os.unlink(here)
                else:
                    rename_noreplace(src_fd, here.name, dir_fd, candidate)
                return candidate
            except FileExistsError:
                n += 1
            except OSError as exc:
                if exc.errno == errno.EXDEV and not across:
                    across = True  # the same name again, by copy
                elif exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    n += 1
                else:
                    raise
    finally:
        os.close(src_fd)


def _restore_to_inbox(here: Path, inbox: Path, rel: str, inode: tuple[int, int]) -> int:
    """Put a claimed file back at `rel` in the inbox, through descriptors only. Returns 1 if it was
    put back, 0 if the inbox still holds the original (then `here` is a spare copy)."""
    parts = parts_of(rel)
    fd = open_inbox(inbox)
    try:
        for part in parts[:-1]:  # the folders on the way, created if gone, never through a link
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # swapped for a link or a file: put it back at the top of the inbox
                break
            os.close(fd)
            fd = nfd
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == inode:
                return 0  # the original never left: what is here is a spare copy
        except FileNotFoundError:
            pass
        place(here, fd, name)
        os.fsync(fd)
        return 1
    finally:
        os.close(fd)
