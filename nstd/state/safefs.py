"""Reaching a user's file inside the inbox without ever leaving it, however names are swapped.

Every path a job names is walked one component at a time from a directory descriptor of the
inbox, each folder opened with O_NOFOLLOW|O_DIRECTORY, so a link anywhere on the way is refused
at that moment (ELOOP) instead of followed. The last component is looked at with lstat through
the parent's descriptor (no open at all for a FIFO, socket, device, folder or link) and only a
regular file is opened, with O_NOFOLLOW|O_NONBLOCK, and checked to be the same inode. The result,
a `Pinned` file, is what intake decodes and what the claim moves or copies: a job's inputs are
pinned once and never re-resolved by name.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from nstd.state.names import free_name_in

#: A file this large that takes under an eighth of its size on disk is refused as sparse.
SPARSE_MIN_BYTES = 16 * 2**20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Refused(Exception):
    """A path that is not a regular file reached inside the inbox: why, in words for error.yaml."""

    def __init__(self, rel: str, reason: str, outside: bool = False):
        self.rel, self.reason, self.outside = rel, reason, outside
        super().__init__(f"{rel!r} {reason}")


def kind_of(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a regular file"


def parts_of(rel: str) -> list[str]:
    """The components of a relative path inside the inbox; refuses what could name anything else."""
    if not rel or "\0" in rel:
        raise Refused(rel, "is not a file name")
    path = PurePosixPath(rel)
    if path.is_absolute():
        raise Refused(rel, "is an absolute path", outside=True)
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise Refused(rel, "names the inbox itself, not a file")
    if ".." in parts:
        raise Refused(rel, "leads out of the inbox ('..' is not allowed)", outside=True)
    return parts


def _walk(inbox_fd: int, rel: str) -> tuple[int, str]:
    """(descriptor of the folder holding the last component, its name), following no link."""
    parts = parts_of(rel)
    fd = os.dup(inbox_fd)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:
                where = "/".join(parts[: i + 1])
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:  # O_NOFOLLOW|O_DIRECTORY on a link gives ELOOP or ENOTDIR: say which it was
                    is_link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    is_link = exc.errno == errno.ELOOP
                if is_link:
                    raise Refused(rel, f"leads through {where!r}, a link", outside=True) from None
                raise Refused(rel, f"leads through {where!r}, which is not a folder") from None
            os.close(fd)
            fd = nfd
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def lstat(inbox_fd: int, rel: str) -> os.stat_result:
    """The entry's own status (a link is not followed). FileNotFoundError when it is not there."""
    parent, name = _walk(inbox_fd, rel)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def regular(inbox_fd: int, rel: str) -> os.stat_result:
    """`lstat()`, refusing anything but a regular file."""
    st = lstat(inbox_fd, rel)
    if not stat.S_ISREG(st.st_mode):
        kind = kind_of(st.st_mode)
        raise Refused(rel, f"is {kind}" + ("" if kind == "a link" else ": only regular files are inputs"),
                      outside=kind == "a link")
    _one_name(rel, st)
    return st


def _one_name(rel: str, st: os.stat_result) -> None:
    """A regular file with other names (a hard link) may be a file from outside the inbox; a
    sparse one would be written out in full by every copy nstd makes (a few KB on disk, gigabytes
    in the outbox)."""
    if st.st_nlink > 1:
        raise Refused(rel, f"has {st.st_nlink - 1} other name(s) (a hard link), which may lie outside the inbox",
                      outside=True)
    if is_sparse(st):
        raise Refused(rel, f"is a sparse file ({st.st_size:,} bytes, {st.st_blocks * 512:,} on disk)")


def is_sparse(st: os.stat_result) -> bool:
    return st.st_size > SPARSE_MIN_BYTES and st.st_blocks * 512 < st.st_size // 8


@dataclass
class Pinned:
    """A regular file in the inbox, open: the descriptor of the file and of its folder."""

    rel: str
    path: Path  # for messages and the manifest; never opened by name again
    parent_fd: int
    name: str
    fd: int
    st: os.stat_result

    def is_still_there(self) -> bool:
        """Does the name still lead to the very file that was pinned?"""
        try:
            st = os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.st.st_dev, self.st.st_ino)

    def reader(self):
        """A binary file object over the pinned file, from its start (closing it leaves the pin open)."""
        fh = os.fdopen(os.dup(self.fd), "rb")
        fh.seek(0)
        return fh

    def close(self) -> None:
        for fd in (self.fd, self.parent_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def pin(inbox_fd: int, inbox: Path, rel: str) -> Pinned:
    """Open a regular file inside the inbox without following any link, and pin it."""
    parent, name = _walk(inbox_fd, rel)
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            regular(inbox_fd, rel)  # raises Refused with the words
        fd = os.open(name, _FILE, dir_fd=parent)
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
            os.close(fd)
            raise Refused(rel, "changed while it was being opened")
        try:
            _one_name(rel, st2)
        except Refused:
            os.close(fd)
            raise
        return Pinned(rel, inbox / rel, parent, name, fd, st2)
    except BaseException:
        os.close(parent)
        raise


_libc = None
RENAME_NOREPLACE = 1


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Move one entry atomically and never over another: renameat2(RENAME_NOREPLACE). Raises
    FileExistsError when `dst` is taken. Where the kernel or filesystem lacks it, a hard link and
    an unlink of the very inode that was linked (folders: a plain rename, which can replace only an
    empty folder)."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), dst)
    st = os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        return _rename_if_free(src_dir_fd, src, dst_dir_fd, dst)
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    except PermissionError:  # protected_hardlinks and someone else's entry
        return _rename_if_free(src_dir_fd, src, dst_dir_fd, dst)
    linked = os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
    now = os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False)
    if (now.st_dev, now.st_ino) == (linked.st_dev, linked.st_ino):
        os.unlink(src, dir_fd=src_dir_fd)


def _rename_if_free(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """The last resort without renameat2: a rename once `dst` is seen free (a race can then
    replace only what appeared under that name in between)."""
    try:
        os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
        raise FileExistsError(errno.EEXIST, "taken", dst)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def read_bounded(folder: Path, rel: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of a regular file inside `folder`, opened as inputs are: no link
    followed, nothing but a regular file, never blocking (a FIFO or /dev/zero planted by a user is
    refused, not read for ever). Raises Refused or OSError."""
    fd = open_inbox(folder)
    try:
        pinned = pin(fd, folder, rel)
    finally:
        os.close(fd)
    try:
        with pinned.reader() as fh:
            return fh.read(max_bytes)
    finally:
        pinned.close()


def open_inbox(inbox: Path) -> int:
    """A descriptor of the inbox folder itself (the admin's path: links in it are the admin's)."""
    return os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def relative(inbox: Path, path: Path) -> str:
    return str(PurePosixPath(*path.relative_to(inbox).parts))


def write_new(dir_fd: int, name: str, content: str | BinaryIO, tmp: str = ".nstd-new") -> None:
    """`content` (text, or a file to copy) as `name` in the folder `dir_fd`: written to a hidden
    temporary name (`tmp`-<pid>, short: `name` may be 255 bytes already; hidden names are never
    taken for a job), flushed, then renamed into place replacing nothing. The one way nstd makes
    a file in a folder it does not own (the inbox) or on another filesystem."""

    tmp = free_name_in(dir_fd, f"{tmp}-{os.getpid()}")
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
        rename_noreplace(dir_fd, tmp, dir_fd, name)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def move_between(src_fd: int, name: str, dst_fd: int, new: str) -> str:
    """Move one file between two folders by descriptor, replacing nothing; across filesystems
    through write_new (flushed first), then the original unlinked. Returns `new`."""
    try:
        rename_noreplace(src_fd, name, dst_fd, new)
        return new
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{name}: no longer a regular file")
    with os.fdopen(fd, "rb") as src:
        write_new(dst_fd, new, src)
    os.unlink(name, dir_fd=src_fd)
    return new
