"""One daemon per root: two `nstd run` on the same folders would take the same jobs twice.

The daemon holds an exclusive flock, for its whole life, on `state/nstd.lock` (which also holds
its pid, for the message a second daemon prints). The kernel drops it when the process ends,
however it ends, so a crash never leaves a stale lock. (Not on the inbox folder itself: an open
descriptor of it would delay the kernel's "deleted" event that tells the watcher a share dropped
out.)
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from nstd.errors import NstdError


class AlreadyRunning(NstdError):
    """Another daemon holds this root (exit 2)."""


class RootLock:
    def __init__(self, state: Path, wait_seconds: float = 0.0):
        """`wait_seconds`: how long a held lock is waited for (a command such as `nstd cancel`
        holds it for a moment); then AlreadyRunning."""
        self.path = state / "nstd.lock"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                self.release()
                raise AlreadyRunning(f"another nstd (pid {self.holder()}) is running on its state folder {state}; "
                                     "one daemon per root") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def held(state: Path) -> bool | None:
        """Does a process hold the root's lock? None when that cannot be told (no access)."""
        try:
            fd = os.open(state / "nstd.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
