"""The real daemon as a subprocess on temporary folders, for end-to-end tests."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

IMAGES = Path(os.environ.get("NSTD_IMAGES") or Path(__file__).resolve().parent.parent.parent / "shared" / "images")


class Daemon:
    def __init__(self, tmp: Path, fake_cuda: dict | None = None, **sections):
        """`fake_cuda` runs the daemon with CUDA faked (tests/fake_cuda.py), its calls logged to
        `self.cuda_calls_path`."""
        self.tmp = tmp
        self.root = tmp / "var"
        cfg = {
            "paths": {"root": str(self.root)},
            "watch": {"settle_seconds": 0.3, "rescan_seconds": 1.0, "missing_timeout": 30.0,
                      "poll_interval_seconds": 0.2},
            "engine": {"device": "cpu", "precision": "fp32"},
            "logging": {"level": "DEBUG"},
            "defaults": {"size": 32, "steps": 2, "gif": {"every": 1}},
            "web": {"enabled": False},  # tests that want the page ask for it (on a free port)
        }
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.fake_cuda = fake_cuda
        self.cuda_calls_path = tmp / "cuda-calls.jsonl"
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        #: sidecar name -> {file name: sha256} of everything dropped for it, for nstd.audit
        self.dropped: dict[str, dict[str, str]] = {}

    # folders
    inbox = property(lambda self: self.root / "inbox")
    outbox = property(lambda self: self.root / "outbox")
    quarantine = property(lambda self: self.root / "quarantine")
    state = property(lambda self: self.root / "state")

    def command(self) -> list[str]:
        """The `nstd` command line this daemon runs with (CUDA faked when asked)."""
        if self.fake_cuda is not None:
            return [sys.executable, str(Path(__file__).with_name("fake_cuda.py"))]
        return [sys.executable, "-m", "nstd.cli"]

    def start(self, wait: bool = True, env: dict | None = None, user: str | None = None) -> "Daemon":
        """`user`: run as that user with no capabilities (setpriv), as the service runs."""
        self.runs += 1
        self.log = open(self.tmp / f"daemon-{self.runs}.log", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
        if self.fake_cuda is not None:
            env.update(NSTD_FAKE_CUDA=json.dumps(self.fake_cuda), NSTD_FAKE_CUDA_LOG=str(self.cuda_calls_path))
        prefix = []
        if user:
            import pwd

            pw = pwd.getpwnam(user)
            prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--inh-caps=-all",
                      "--bounding-set=-all"]
        self.proc = subprocess.Popen([*prefix, *self.command(), "run", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait(lambda: (self.status() or {}).get("state") == "running" and
                      (self.status() or {}).get("pid") == self.proc.pid, 90, "the daemon to start")
        return self

    def write_config(self, **sections) -> None:
        cfg = yaml.safe_load(self.config.read_text())
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        self.config.write_text(yaml.safe_dump(cfg))

    def cuda_calls(self, name: str) -> list[list]:
        """The arguments of each faked CUDA call `name` the daemon made."""
        if not self.cuda_calls_path.exists():
            return []
        lines = [json.loads(x) for x in self.cuda_calls_path.read_text().splitlines() if x]
        return [args for n, args in lines if n == name]

    def status(self) -> dict | None:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("daemon-*.log")))

    def wait(self, predicate, timeout: float = 60, what: str = "a condition") -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.logs()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.logs()[-4000:]}")

    # jobs
    def image(self, name: str, as_name: str | None = None, folder: Path | None = None) -> Path:
        dst = (folder or self.inbox) / (as_name or name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGES / name, dst)
        return dst

    def drop(self, name: str, sidecar: dict | str, content: str = "hoovertowernight.jpg",
             style: str = "starry_night.jpg", images: bool = True) -> Path:
        """Images first, then the sidecar (written elsewhere and renamed in, as careful tools do)."""
        if images:
            if content:
                self.image(content)
            if style:
                self.image(style)
        text = sidecar if isinstance(sidecar, str) else yaml.safe_dump(sidecar)
        tmp = self.inbox / f".{name}.yaml.tmp"
        tmp.write_text(text)
        self._remember(name, text)
        os.rename(tmp, self.inbox / f"{name}.yaml")
        return self.inbox / f"{name}.yaml"

    def _remember(self, name: str, text: str) -> None:
        from nstd.audit import digest

        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError):  # hostile texts are what some tests drop
            data = None
        names = []
        if isinstance(data, dict):
            for key in ("content", "style"):
                value = data.get(key)
                if isinstance(value, str):
                    names.append(value)
        names += [p.name for p in self.inbox.glob(f"{name}.content.*")] + [p.name for p in self.inbox.glob(f"{name}.style.*")]
        files = {n: digest(self.inbox / n) for n in names
                 if "/" not in n and (self.inbox / n).is_file() and not (self.inbox / n).is_symlink()}
        files[f"{name}.yaml"] = hashlib.sha256(text.encode()).hexdigest()
        self.dropped[f"{name}.yaml"] = files

    def audit(self, **kw) -> list[str]:
        from nstd.audit import audit

        return audit(self.root, self.dropped, **kw)

    def landed(self, name: str) -> bool:
        return (self.outbox / name).is_dir()

    def quarantined(self, name: str) -> bool:
        return (self.quarantine / name).is_dir()

    def error(self, name: str) -> dict:
        return yaml.safe_load((self.quarantine / name / "error.yaml").read_text())

    def wait_landed(self, *names: str, timeout: float = 90) -> None:
        self.wait(lambda: all(self.landed(n) for n in names), timeout, f"{names} in the outbox")

    def wait_state_clean(self, timeout: float = 30) -> None:
        """The outbox rename comes before the state folder is removed: wait for both."""
        self.wait(lambda: os.listdir(self.state / "jobs") == [], timeout, "an empty state/jobs")

    def wait_quarantined(self, *names: str, timeout: float = 90) -> None:
        self.wait(lambda: all(self.quarantined(n) for n in names), timeout, f"{names} in quarantine")
