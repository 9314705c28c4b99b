"""`NAME.waiting.txt` beside a job file that waits for an input: the dropper looks in the inbox,
not at `nstd status`, and otherwise learnt nothing for the 15 minutes before the quarantine.

The inbox is shared with its users, so a note is written as a stranger's folder demands: a hidden
temporary file created exclusively (no link followed), then linked to its name, which never
replaces a file a user put there; only a regular file of the service's own user holding a note
is ever replaced or removed.
"""
from __future__ import annotations

import errno
import os
import stat
import uuid

from nstd.job.file import WAITING_NOTE as SUFFIX

HEAD = b"nstd: "


def name_for(sidecar: str) -> str:
    return sidecar.rsplit(".", 1)[0] + SUFFIX


def _ours(inbox_fd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=inbox_fd, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 4096:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=inbox_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(HEAD)) == HEAD
    finally:
        os.close(fd)


def write(inbox_fd: int, sidecar: str, text: str) -> bool:
    """Put the note beside `sidecar`; False when a file of someone else's holds its name."""
    name, tmp = name_for(sidecar), f".nstd-note-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=inbox_fd)
    try:
        os.fchmod(fd, 0o644)  # readable by the dropper whatever the umask
        os.write(fd, HEAD + text.encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, name, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd, follow_symlinks=False)
            return True
        except OSError as exc:
            if exc.errno != errno.EEXIST or not _ours(inbox_fd, name):
                return False
        os.replace(tmp, name, src_dir_fd=inbox_fd, dst_dir_fd=inbox_fd)  # our older note: a new text
        return True
    finally:
        try:
            os.unlink(tmp, dir_fd=inbox_fd)
        except OSError:
            pass


def remove(inbox_fd: int, sidecar: str) -> None:
    """Take the note away, if it is ours."""
    name = name_for(sidecar)
    if _ours(inbox_fd, name):
        try:
            os.unlink(name, dir_fd=inbox_fd)
        except OSError:
            pass
