"""outbox.keep_days: results older than that leave the outbox, said in the log and the status.

The outbox otherwise grows for ever under an overnight batch a night. Only what nstd delivered
goes: a folder (not a link) directly in the outbox holding nstd's report.json, aged by that
report's time; a result folder's inputs/ (the files its dropper gave) go with it, which is why
the default, 0, keeps everything. Looked at once at the start and then hourly by the intake.
"""
from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from loguru import logger

#: How often the outbox is looked at.
EVERY_SECONDS = 3600.0
#: Names kept in status.json of the last removal.
NAMES_SHOWN = 10


class Expiry:
    def __init__(self, cfg: dict, outbox: Path, status):
        self.cfg, self.outbox, self.status = cfg, outbox, status
        self.next_at = 0.0

    def tick(self, now: float) -> None:
        """From the intake loop (monotonic `now`): remove what is due, at most hourly."""
        days = self.cfg["outbox"]["keep_days"]
        if not days or now < self.next_at:
            return
        self.next_at = now + EVERY_SECONDS
        removed = expire(self.outbox, days)
        if removed:
            logger.info("removed {} result(s) older than {:g} days from the outbox (outbox.keep_days): {}",
                        len(removed), days, ", ".join(removed[:NAMES_SHOWN]) + (" ..." if len(removed) > NAMES_SHOWN else ""))
            before = (self.status.data.get("expired") or {}).get("count", 0)
            self.status.update(force=True, expired={"count": before + len(removed), "at": time.time(), "days": days,
                                                    "names": removed[:NAMES_SHOWN]})


def expire(outbox: Path, days: float, now: float | None = None) -> list[str]:
    """Remove the outbox's result folders whose report.json is older than `days`; their names."""
    cutoff = (time.time() if now is None else now) - days * 86400
    removed = []
    try:
        entries = sorted(os.scandir(outbox), key=lambda e: e.name)
    except OSError as exc:
        logger.error("cannot read the outbox {} to remove old results: {}", outbox, exc)
        return removed
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue  # a transfer under way, a file, a link: not a delivered result
        try:
            report = os.stat(os.path.join(e.path, "report.json"), follow_symlinks=False)
        except OSError:
            continue  # not nstd's delivery
        if not stat.S_ISREG(report.st_mode) or report.st_mtime >= cutoff:
            continue
        try:
            shutil.rmtree(e.path)  # descriptor-based on Linux: a link inside is removed, never followed
        except OSError as exc:
            logger.warning("cannot remove the old result {}: {}", e.name, exc)
            continue
        removed.append(e.name)
    return removed
