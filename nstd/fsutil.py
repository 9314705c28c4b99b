"""Crash-safe file writing: every file nstd produces appears complete or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextmanager
def atomic_open(path: Path | str, mode: str = "wb", durable: bool = True, parents: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it into place
    (without `durable`, no fsync: for what is rewritten every few seconds and may be lost).

    On any exception the temporary file is removed and `path` is left untouched. The file gets
    the mode a plain open() would give (0666 less the umask), not mkstemp's private 0600, so
    results on a shared outbox stay readable by the group.
    """
    path = Path(path)
    if parents:  # without: a folder that has gone stays gone (a transfer another process took over)
        path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if len(path.name.encode()) <= 200 else ".nstd-"  # stay under 255 bytes
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path | str, data: bytes, durable: bool = True, parents: bool = True) -> None:
    with atomic_open(path, "wb", durable, parents) as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str, parents: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"), parents=parents)  # a lone surrogate from a file name
