"""The notify protocol against a real AF_UNIX datagram socket, the health rule, and the unit file."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nstd.daemon.notify import Notifier, healthy

REPO = Path(__file__).resolve().parent.parent


def bound_socket(path_or_abstract: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path_or_abstract)
    s.settimeout(5)
    return s


def test_messages_reach_a_path_socket(tmp_path):
    sock = bound_socket(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_seconds == 4.0
    assert n.ready("watching /srv/nstd/inbox")
    assert sock.recv(4096) == b"READY=1\nSTATUS=watching /srv/nstd/inbox"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.extend_timeout(90)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_abstract_socket_and_no_socket():
    name = f"nstd-test-{os.getpid()}"
    sock = bound_socket("\0" + name)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
    assert sock.recv(4096) == b"STATUS=hello"
    off = Notifier({})
    assert not off.enabled and not off.ready("x") and off.watchdog_seconds is None


def test_watchdog_is_only_for_its_own_pid():
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 1.0
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None


def test_a_vanished_socket_is_not_an_error(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.send(STATUS="x") is False


def test_health_rule():
    assert healthy(True, [(True, 100.0)], limit=30, now=110)
    assert not healthy(False, [(True, 100.0)], limit=30, now=110)  # watcher down
    assert not healthy(True, [(False, 100.0)], limit=30, now=110)  # worker thread died
    assert not healthy(True, [(True, 100.0)], limit=30, now=131)  # worker hung
    assert not healthy(True, [(True, 100.0), (True, 50.0)], limit=30, now=110)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path):
    unit = (REPO / "systemd" / "nstd.service").read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's nstd.
    nstd = Path(sys.executable).parent / "nstd"
    unit = unit.replace("/opt/nstd/.venv/bin/nstd", str(nstd))
    (tmp_path / "nstd.service").write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nstd.service")], capture_output=True, text=True)
    problems = [l for l in (r.stdout + r.stderr).splitlines() if "nstd.service" in l]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_a_full_queue_never_blocks(tmp_path):
    """Nobody reads this socket: sends must fail fast once its queue is full, not hang."""
    import time

    sock = bound_socket(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    t0 = time.monotonic()
    results = [n.watchdog() for _ in range(2000)]
    assert time.monotonic() - t0 < 5
    assert results[0] and not all(results)
    assert sock.recv(4096) == b"WATCHDOG=1"
