"""Inbox events from watchdog: hints that wake the intake loop, nothing more.

The handler only sets an Event, so no user file can raise inside the observer thread. The intake
loop also rescans on a timer, so a lost event or an overflowed inotify queue strands nothing, and
it restarts the observer if its thread dies (a share that dropped out, say).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from nstd.daemon.inbox import is_ignored


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event):
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type in ("created", "modified", "moved", "closed", "deleted"):
                dest = getattr(event, "dest_path", "") or event.src_path
                name = Path(str(dest)).name
                if not is_ignored(name) or event.event_type == "moved":
                    self.wake.set()
        except Exception:  # never let an odd event kill the observer
            self.wake.set()


class InboxWatcher:
    def __init__(self, inbox: Path, polling: bool, poll_interval: float, wake: threading.Event):
        self.inbox = inbox
        self.polling = polling
        self.poll_interval = poll_interval
        self.wake = wake
        self.observer = None
        self.inode: int | None = None
        self.restarts = 0
        self._warned = False

    def _inbox_inode(self) -> int | None:
        try:
            return os.stat(self.inbox).st_ino
        except OSError:
            return None

    def start(self) -> bool:
        """Start an observer; False (and one warning) if the inbox cannot be watched right now."""
        inode = self._inbox_inode()
        obs = PollingObserver(timeout=self.poll_interval) if self.polling else Observer()
        try:
            if inode is None:
                raise FileNotFoundError(f"{self.inbox} does not exist")
            obs.schedule(_Wake(self.wake), str(self.inbox), recursive=False)
            obs.start()
        except Exception as exc:
            if not self._warned:
                logger.warning("cannot watch {} ({}); rescanning on the timer until it can be", self.inbox, exc)
                self._warned = True
            self.observer = None
            return False
        self.observer, self.inode, self._warned = obs, inode, False
        return True

    def alive(self) -> bool:
        return self.observer is not None and self.observer.is_alive()

    def ensure_alive(self) -> None:
        """Restart the observer if its thread died or the inbox folder was removed or replaced
        (a recreated folder is a new inode, which the old inotify watch never sees)."""
        inode = self._inbox_inode()
        if self.alive() and inode == self.inode:
            return
        if self.observer is not None:
            logger.warning("the inbox observer stopped or the inbox folder went away; restarting it")
            self.restarts += 1
            self.stop()
        if inode is not None and self.start():
            self.wake.set()  # look at the (new) folder at once

    def stop(self) -> None:
        obs, self.observer = self.observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=5)
            except Exception:
                pass
