"""The one rule for a name nstd picks beside names it must not take: `name` if it is free, else
`name-2`, `name-3`, ... (for a user's file the number goes before its suffix: `a-2.jpg`, so the
file keeps its type; `mark` names why: `job-retry-2.yaml`)."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Callable

#: A quarantine folder `nstd retry` put back is renamed NAME.retried-<time> (never taken for a job).
RETRIED = ".retried-"


def free_name(name: str, taken: Callable[[str], bool], keep_suffix: bool = False, mark: str = "") -> str:
    """The first of `name`, `{stem}-{mark}2{suffix}`, `-3`, ... that `taken` says is free."""
    if not taken(name):
        return name
    suffix = PurePosixPath(name).suffix if keep_suffix and not name.startswith(".") else ""
    stem = name[:len(name) - len(suffix)]
    n = 2
    while taken(candidate := f"{stem}-{mark}{n}{suffix}"):
        n += 1
    return candidate


def taken_in(dir_fd: int) -> Callable[[str], bool]:
    """Whether a name exists (a link counts, unfollowed) in the folder open as `dir_fd`."""
    def taken(name: str) -> bool:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
    return taken


def taken_at(parent: Path) -> Callable[[str], bool]:
    """Whether a name exists (a link counts, unfollowed) in `parent`."""
    return lambda name: os.path.lexists(parent / name)


def free_name_in(dir_fd: int, name: str) -> str:
    """`name`, else `name-2`, ...: a name not taken in the folder `dir_fd` (nstd's own names)."""
    return free_name(name, taken_in(dir_fd))


def unique_name(parent: Path, name: str) -> Path:
    """`parent/name`, else `name-2`, ...: never an existing entry (folders nstd makes)."""
    return parent / free_name(name, taken_at(parent))
