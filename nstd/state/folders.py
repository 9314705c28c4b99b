"""The daemon's folders (inbox, outbox, quarantine, state, logs) from config.yaml's `paths:`: their
layout checked, created, and their owners and modes checked (a folder another user could change is
refused at start)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


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

    def create(self, root: Path | None = None) -> None:
        """The folders that are missing: the service's own ones writable by it alone (0755, whatever
        the umask), the inbox as the umask makes it (the group's, docs/service.md)."""
        for d in (root, self.outbox, self.quarantine, self.state, self.jobs, self.logs):
            if d is not None and not d.exists():
                d.parent.mkdir(parents=True, exist_ok=True)
                d.mkdir(mode=0o755, exist_ok=True)
        self.inbox.mkdir(parents=True, exist_ok=True)

    def check_modes(self, root: Path | None = None) -> None:
        """Refuse to start (as sshd refuses a loose key file) when the root, state/, the outbox,
        the quarantine or logs/ is a link, or can be written by anyone but the service (or root):
        a member of the inbox's group could otherwise swap state/ for a folder of her own (claims,
        leases, cancel requests), the quarantine for a link the page would serve, or delete
        others' results. Only the inbox is the group's to write."""
        me = os.geteuid()
        for label, path in (("paths.root", root), ("paths.state", self.state), ("paths.outbox", self.outbox),
                            ("paths.quarantine", self.quarantine), ("paths.logs", self.logs)):
            if path is None:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise ValueError(f"{label} ({path}) is a symbolic link; give the real folder "
                                 f"({os.path.realpath(path)}) in the config instead")
            if not stat.S_ISDIR(st.st_mode):
                raise ValueError(f"{label} ({path}) is not a folder")
            who = [w for w, bit in (("its group", stat.S_IWGRP), ("everyone", stat.S_IWOTH)) if st.st_mode & bit]
            if who:
                raise ValueError(f"{label} ({path}) can be written by {' and '.join(who)} "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); only the service may write there: "
                                 f"chmod go-w {path} (the inbox alone is the group's; docs/service.md)")
            if st.st_uid not in (me, 0):
                raise ValueError(f"{label} ({path}) belongs to uid {st.st_uid}, not to the service (uid {me}), "
                                 f"who could change it: chown it to the service's user (docs/service.md)")
