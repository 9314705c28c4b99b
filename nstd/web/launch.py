"""The daemon's side of the status page: start its process, learn its address, keep it running,
stop it. Torch-free and Flask-free: the page's libraries load only in its own process."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger

#: How long the page's process may take to say its address.
START_SECONDS = 30.0
#: A page process that died (or could not listen) is started again after this long, doubled each
#: time it fails again, up to MAX_RESTART_SECONDS.
RESTART_SECONDS = 30.0
MAX_RESTART_SECONDS = 600.0
#: glibc's malloc for the page's process: a thumbnail's decode (tens of MiB) is mapped and given back
#: to the system when freed, not kept in a per-thread arena (three clients asking for thumbnails of
#: distinct 4000 px PNGs held the page at 226 MiB; so, at most 94: bench/page_load.py). The
#: operator's own settings, if any, win.
PAGE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


class StatusPage:
    def __init__(self, web: dict, folders, root: Path):
        self.settings = {"listen": web["listen"], "results": web["results"], "refresh_seconds": web["refresh_seconds"],
                         "hosts": web["hosts"], "token": web["token"], "state": str(folders.state), "root": str(root), "outbox": str(folders.outbox),
                         "quarantine": str(folders.quarantine), "parent": os.getpid()}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.next_start = 0.0
        self.backoff = RESTART_SECONDS

    def start(self) -> str | None:
        """Start the page's process; its address, or None (logged) when it cannot serve."""
        self.url = None
        self.next_start = time.monotonic() + self.backoff
        env = {**PAGE_MALLOC, **os.environ, "NSTD_WEB": json.dumps(self.settings)}
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "nstd.web.server"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, text=True)
        except OSError as exc:
            logger.error("status page: cannot start: {}; the daemon runs without it", exc)
            return None
        line = self._first_line()
        if not line.startswith("http"):
            self.stop()
            logger.error("status page: {}; trying again in {:.0f} s", line or "it did not start", self.backoff)
            self.backoff = min(MAX_RESTART_SECONDS, self.backoff * 2)
            return None
        self.url, self.backoff = line, RESTART_SECONDS
        logger.info("status page on {}", self.url)
        return self.url

    def _first_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_SECONDS)
        return self.proc.stdout.readline().strip() if ready else ""

    def ensure_alive(self) -> str | None:
        """From the intake loop: a page that died (or never listened) is started again, with a
        growing delay. Returns the page's address now (it may have changed)."""
        if self.proc is None or self.proc.poll() is None or time.monotonic() < self.next_start:
            return self.url
        if self.url is not None:
            logger.error("status page: its process ended ({}); starting it again", self.proc.returncode)
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
