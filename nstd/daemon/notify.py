"""systemd glue: the sd_notify protocol and the watchdog's health rule.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET
(a leading `@` means the abstract namespace). The maintained wrappers need libsystemd or are long
unmaintained, and the protocol is a dozen lines, so nstd keeps its own, tested against a real socket.
Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Iterable, Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_seconds = _watchdog_seconds(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send e.g. READY=1, STATUS=..., WATCHDOG=1; False (never an exception) if it could not."""
        if self.address is None:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block: a full receive queue must not stall the daemon (a ping is dropped).
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
            return True
        except OSError:  # includes BlockingIOError on a full queue
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog period systemd expects pings within, if it is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def healthy(watcher_alive: bool, workers: Iterable[tuple[bool, float]], limit: float, now: float | None = None) -> bool:
    """Ping the watchdog only while the watcher runs and every worker is alive and not hung.

    `workers` holds (thread alive, last heartbeat as time.monotonic()); a worker beats on every
    optimisation step and every time it looks at the queue, so a silence longer than `limit` means
    it is stuck (a wedged GPU call, say) and systemd should restart the service.
    """
    now = time.monotonic() if now is None else now
    return watcher_alive and all(alive and now - beat < limit for alive, beat in workers)
