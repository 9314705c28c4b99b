"""Load: N jobs dropped at once (tiny images, one step), all must land; the daemon's memory before
and after, pickup latency (drop -> start) and the per-job overhead.

    .venv/bin/python bench/load.py 1000            # the full run (README figures)
    .venv/bin/python bench/load.py 30 --json       # what CI's test runs

Prints a markdown table (or JSON); exits 1 if a job is missing or the folder audit finds a problem.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from harness import IMAGES, Daemon  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(n: int, workdir: Path) -> dict:
    from PIL import Image

    d = Daemon(workdir, watch={"settle_seconds": 0.5, "rescan_seconds": 10},
               defaults={"size": 32, "steps": 1, "gif": False})
    d.start()
    try:
        Image.open(IMAGES / "starry_night.jpg").convert("RGB").resize((32, 20)).save(d.inbox / "style.png")
        d.dropped = {}
        Image.open(IMAGES / "hoovertowernight.jpg").convert("RGB").resize((32, 17)).save(workdir / "content.png")
        # A warm-up job: the first one loads kernels and thread pools, which is not growth.
        shutil.copy(workdir / "content.png", d.inbox / "warm.png")
        shutil.copy(d.inbox / "style.png", d.inbox / "warm-style.png")  # its own: a style leaves with its last job
        d.drop("warm", {"content": "warm.png", "style": "warm-style.png"}, images=False)
        d.wait_landed("warm")
        time.sleep(1.0)
        rss_before = rss_mb(d.proc.pid)
        staging = workdir / "staging"
        staging.mkdir()
        for i in range(n):
            shutil.copy(workdir / "content.png", d.inbox / f"c{i}.png")
        for i in range(n):
            (staging / f"j{i}.yaml").write_text(f"content: c{i}.png\nstyle: style.png\n")
        t0 = time.time()
        for i in range(n):
            os.rename(staging / f"j{i}.yaml", d.inbox / f"j{i}.yaml")
            d._remember(f"j{i}", f"content: c{i}.png\nstyle: style.png\n")
        t_dropped = time.time()
        d.wait(lambda: sum(1 for _ in d.outbox.iterdir()) >= n + 1, 60 + n * 3, f"{n} jobs to land")
        t_done = time.time()
        time.sleep(1.0)
        rss_after = rss_mb(d.proc.pid)
        reports = [json.loads((d.outbox / f"j{i}" / "report.json").read_text()) for i in range(n)]
    finally:
        code = d.stop()
    waited = sorted(r["timings"]["waited"] for r in reports)
    optimised = [r["timings"]["optimised"] for r in reports]
    problems = d.audit()
    wall = t_done - t0
    return {
        "jobs": n,
        "landed": sum(1 for i in range(n) if d.landed(f"j{i}")),
        "quarantined": len(os.listdir(d.quarantine)),
        "audit_problems": problems,
        "exit_code": code,
        "drop_seconds": round(t_dropped - t0, 2),
        "wall_seconds": round(wall, 1),
        "jobs_per_hour": round(n / wall * 3600),
        "pickup_latency_median_s": round(statistics.median(waited), 2),
        "pickup_latency_first_s": round(waited[0], 2),
        "per_job_seconds": round(wall / n, 3),
        "per_job_optimise_seconds": round(statistics.mean(optimised), 3),
        "per_job_overhead_seconds": round(wall / n - statistics.mean(optimised), 3),
        "rss_before_mb": round(rss_before),
        "rss_after_mb": round(rss_after),
        "rss_growth_mb": round(rss_after - rss_before, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nstd-load-") as tmp:
        r = run(args.jobs, Path(tmp))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
              f"Python {platform.python_version()}\n")
        print("| figure | value |\n| --- | --- |")
        for k, v in r.items():
            print(f"| {k} | {v} |")
    ok = r["landed"] == r["jobs"] and not r["audit_problems"] and r["exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
