"""What nstd spends before its first step: `nstd stylize` and `nstd run` against a bare `import torch`.

Alternates, in one invocation, whole processes of:
- `python -c "import torch"` (the floor: every nstd command needs torch);
- `nstd stylize` of a 32 px picture, 1 step (start-up is nearly all of it);
- `nstd run --until-empty` on a fresh root whose inbox already holds one such job: the whole
  process, and from the process's start to the job's "started" line in its job.log (the
  daemon's own start-up: config, recovery, the Engine, the watcher; settle_seconds is 0.3 here).

Then prints medians and ratios to `import torch` (the issue's target for `nstd stylize`: 1.4x),
and the ten slowest imports of `nstd stylize` by `python -X importtime` (cumulative).

    .venv/bin/python bench/startup.py                      # CPU, 3 rounds
    .venv/bin/python bench/startup.py --device cuda --rounds 5
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from harness import IMAGES, Daemon  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def stylize(args: argparse.Namespace, tmp: Path) -> float:
    return timed([sys.executable, "-m", "nstd.cli", "stylize", str(IMAGES / "tubingen.jpg"),
                  str(IMAGES / "starry_night.jpg"), "-o", str(tmp / "out.png"), "--size", "32", "--steps", "1",
                  "--device", args.device, "--precision", args.precision, "-q"])


def run_until_empty(args: argparse.Namespace, tmp: Path) -> tuple[float, float]:
    """(whole process, process start -> the job's "started" line) of `nstd run --until-empty`."""
    work = tmp / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    d = Daemon(work, engine={"device": args.device, "precision": args.precision}, logging={"level": "INFO"},
               defaults={"size": 32, "steps": 1, "gif": False})
    d.drop("job", {"content": "tubingen.jpg", "style": "starry_night.jpg"}, content="tubingen.jpg")
    start = time.time()
    whole = timed([sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(d.config)])
    log = (d.outbox / "job" / "job.log").read_text()
    line = next(x for x in log.splitlines() if " started (attempt" in x)
    t = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float("0" + line[19:23])
    return whole, t - start


def slowest_imports(n: int = 10) -> list[tuple[float, str]]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nstd.cli, nstd.engine.stylize"],
                         env=ENV, capture_output=True, text=True).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top-level and first-level imports
            rows.append((int(m.group(2)) / 1e6, m.group(4)))
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    torch_s, stylize_s, run_s, first_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="nstd-startup-") as tmp:
        tmp = Path(tmp)
        timed([sys.executable, "-c", "import torch"])  # warm the page cache for everyone
        for _ in range(args.rounds):
            torch_s.append(timed([sys.executable, "-c", "import torch"]))
            stylize_s.append(stylize(args, tmp))
            whole, first = run_until_empty(args, tmp)
            run_s.append(whole)
            first_s.append(first)
    base = statistics.median(torch_s)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
          f"device {args.device}, precision {args.precision}, Python {platform.python_version()}; "
          f"{args.rounds} alternating rounds, medians\n")
    print("| process | median s | runs | / import torch |\n| --- | --- | --- | --- |")
    for name, xs in (("python -c 'import torch'", torch_s), ("nstd stylize, 32 px, 1 step", stylize_s),
                     ("nstd run --until-empty, one 32 px job, whole", run_s),
                     ("nstd run: process start -> the job started", first_s)):
        m = statistics.median(xs)
        print(f"| {name} | {m:.2f} | {', '.join(f'{x:.2f}' for x in xs)} | {m / base:.2f}x |")
    print("\nslowest imports of `nstd stylize` (python -X importtime, cumulative s):\n")
    for s, name in slowest_imports():
        print(f"    {s:6.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
