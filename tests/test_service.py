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


UNIT = REPO / "systemd" / "nstd.service"
DROP_IN = REPO / "systemd" / "nstd.service.d" / "paths.conf"


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each line of a unit file, in order; comments skipped."""
    section, out = "", []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(path) if (s, k) == (section, key)]


def test_site_paths_are_in_the_drop_in_only():
    assert "/srv/nstd" not in UNIT.read_text()  # comments included
    assert "/srv/nstd" in DROP_IN.read_text()
    [exec_start] = values(UNIT, "Service", "ExecStart")
    assert exec_start == "/opt/nstd/.venv/bin/nstd run"  # the config comes from $NSTD_CONFIG
    assert "--config" not in UNIT.read_text()
    assert not values(DROP_IN, "Service", "ExecStart")  # and the drop-in does not put it back
    for key in ("RequiresMountsFor", "WorkingDirectory", "ReadWritePaths"):
        assert not [k for _, k, _ in directives(UNIT) if k == key], f"{key}= belongs in paths.conf"


def test_the_drop_in_paths_agree():
    from pathlib import PurePosixPath as P

    [mounts] = values(DROP_IN, "Unit", "RequiresMountsFor")
    [workdir] = values(DROP_IN, "Service", "WorkingDirectory")
    [writable] = values(DROP_IN, "Service", "ReadWritePaths")
    env = dict(v.split("=", 1) for v in values(DROP_IN, "Service", "Environment"))
    assert set(env) == {"TORCH_HOME", "NSTD_CONFIG"}
    for path in (mounts, workdir, writable, env["TORCH_HOME"], env["NSTD_CONFIG"]):
        assert P(path).is_absolute() and " " not in path, path
    for path in (workdir, env["TORCH_HOME"]):  # the root and the weight cache: writable, and mounted
        assert P(path).is_relative_to(writable) and P(path).is_relative_to(mounts), path
    assert env["NSTD_CONFIG"] == "/etc/nstd/config.yaml"


def verify(tmp_path: Path, drop_in: str) -> str:
    """systemd-analyze verify on a copy of the unit with `drop_in` beside it as
    nstd.service.d/paths.conf; returns the lines about either file."""
    unit = UNIT.read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's nstd.
    nstd = Path(sys.executable).parent / "nstd"
    unit = unit.replace("/opt/nstd/.venv/bin/nstd", str(nstd))
    (tmp_path / "nstd.service").write_text(unit)
    (tmp_path / "nstd.service.d").mkdir(exist_ok=True)
    (tmp_path / "nstd.service.d" / "paths.conf").write_text(drop_in)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nstd.service")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # verify exits 0 even for a bad line (it ignores it, as systemd would): read what it says.
    return "\n".join(l for l in (r.stdout + r.stderr).splitlines() if "nstd.service" in l)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path):
    assert verify(tmp_path, DROP_IN.read_text()) == ""
    # And verify does read the drop-in beside the copy: a bad line in it is reported.
    broken = DROP_IN.read_text().replace("WorkingDirectory=/", "WorkingDirectory=")
    said = verify(tmp_path, broken)
    assert "paths.conf" in said and "WorkingDirectory=" in said, said


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


WORKER_UNIT = REPO / "systemd" / "nstd-worker@.service"


def test_the_worker_unit_takes_the_same_drop_in():
    assert "/srv/nstd" not in WORKER_UNIT.read_text()
    [exec_start] = values(WORKER_UNIT, "Service", "ExecStart")
    assert exec_start == "/opt/nstd/.venv/bin/nstd worker --device cuda:%i"
    for key in ("RequiresMountsFor", "WorkingDirectory", "ReadWritePaths"):
        assert not [k for _, k, _ in directives(WORKER_UNIT) if k == key], f"{key}= belongs in paths.conf"
    # As hardened as the daemon's unit, but with the network for Redis.
    for key in ("NoNewPrivileges", "ProtectSystem", "DevicePolicy", "SystemCallFilter"):
        assert values(WORKER_UNIT, "Service", key) == values(UNIT, "Service", key), key
    assert "AF_INET" in values(WORKER_UNIT, "Service", "RestrictAddressFamilies")[0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_worker_unit_verifies(tmp_path):
    nstd = Path(sys.executable).parent / "nstd"
    unit = WORKER_UNIT.read_text().replace("/opt/nstd/.venv/bin/nstd", str(nstd))
    (tmp_path / "nstd-worker@.service").write_text(unit)
    (tmp_path / "nstd-worker@.service.d").mkdir()
    (tmp_path / "nstd-worker@.service.d" / "paths.conf").write_text(DROP_IN.read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nstd-worker@0.service")], capture_output=True,
                       text=True)
    said = "\n".join(l for l in (r.stdout + r.stderr).splitlines() if "nstd-worker" in l)
    assert r.returncode == 0 and said == "", r.stdout + r.stderr
