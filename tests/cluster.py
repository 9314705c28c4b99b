"""A real Redis and real `nstd worker` processes, for the distributed tests and bench/cluster_load.py.

redis-server is Debian's package `redis-server` (.ci/run and `make redis` install it); each test
starts its own on a free loopback port, without persistence, so that a restart loses what Redis
held: the worst case the intake must survive.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        self.starts += 1
        log = open(self.folder / f"redis-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL by default: whatever Redis held is gone (no persistence either way)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def llen(self, key: str) -> int:
        import redis

        return int(redis.Redis.from_url(self.url).llen(key))


class Workers:
    """`nstd worker` subprocesses on one config (CPU, tiny jobs)."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp, self.config = tmp, config
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_paths: dict[str, Path] = {}
        self.starts = 0

    def start(self, name: str, env: dict | None = None) -> subprocess.Popen:
        self.starts += 1
        self.log_paths[name] = self.tmp / f"worker-{name}-{self.starts}.log"
        log = open(self.log_paths[name], "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "nstd.cli", "worker", "--config", str(self.config),
                                 "--device", "cpu", "--name", name], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)

    def stop_all(self, timeout: float = 60) -> dict[str, int]:
        codes = {}
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def log(self, name: str) -> str:
        """The output of the latest process called `name`."""
        return self.log_paths[name].read_text(errors="replace")

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("worker-*.log")))
