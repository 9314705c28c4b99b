"""The daemon's cost outside the optimisation, on a batch of jobs that share one style.

Drops N jobs (different content pictures, one style file, GIF on) into a real daemon at once and
reads every report.json: decode, style targets, optimisation and encoding per job, the batch's
wall clock from the first start to the last landing, jobs per hour, and how often the style
targets were computed (once for the whole batch is the goal).

    .venv/bin/python bench/daemon_overhead.py                               # CPU, 256 px, 30 steps
    .venv/bin/python bench/daemon_overhead.py --device cuda --size 512 --steps 300   # the issue's figure

"Overhead" is everything in a job's share of the wall clock that is not the optimiser's loop:
decode, targets, GIF and result encoding, report, the move to the outbox and the hand-over from
one job to the next. Prints a markdown table; exits 1 if a job did not land.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from harness import Daemon  # noqa: E402

CONTENTS = ("tubingen.jpg", "hoovertowernight.jpg", "golden_gate.jpg", "shipwreck.jpg", "the_scream.jpg",
            "woman-with-hat-matisse.jpg")
STYLE = "starry_night.jpg"


def stamp(line: str) -> float:
    """Seconds since the epoch of a job.log line ("2026-11-25 03:21:19.123 | ...")."""
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float("0" + line[19:23])


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], float]:
    """Every job's report, and the batch's wall clock from the first start to the last landing."""
    d = Daemon(workdir, engine={"device": args.device, "precision": args.precision},
               defaults={"size": args.size, "steps": args.steps, "stages": 1, "gif": {"every": args.gif_every}},
               logging={"level": "INFO"})
    d.start()
    try:
        names = [f"job{i}" for i in range(args.jobs)]
        d.image(STYLE)
        for i, name in enumerate(names):
            content = CONTENTS[i % len(CONTENTS)]
            d.image(content, f"{name}-{content}")
        for i, name in enumerate(names):
            d.drop(name, {"content": f"{name}-{CONTENTS[i % len(CONTENTS)]}", "style": STYLE}, images=False)
        d.wait_landed(*names, timeout=args.jobs * args.timeout_per_job)
        reports = [json.loads((d.outbox / name / "report.json").read_text()) for name in names]
        first = min(next(stamp(x) for x in (d.outbox / name / "job.log").read_text().splitlines()
                         if " started (attempt" in x) for name in names)
        last = max((d.outbox / name).stat().st_mtime for name in names)
    finally:
        d.stop()
    return reports, last - first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gif-every", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--timeout-per-job", type=float, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nstd-overhead-") as tmp:
        reports, wall = run(args, Path(tmp))

    keys = ("loaded", "targets", "optimised", "encoded")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
          f"device {reports[0]['device']}, precision {reports[0]['precision']}; {args.jobs} jobs, "
          f"{args.size} px, {args.steps} steps, GIF frame every {args.gif_every} step(s), one shared style\n")
    print("| job | size | " + " | ".join(f"{k} s" for k in keys) + " | style targets |")
    print("| --- | --- |" + " --- |" * (len(keys) + 1))
    misses = 0
    for r in reports:
        t = r["timings"]
        computed = r["style_cache"]["misses"] > misses
        misses = r["style_cache"]["misses"]
        print(f"| {r['job']} | {r['size_used'][0]}x{r['size_used'][1]} | "
              + " | ".join(f"{t[k]:.2f}" for k in keys) + f" | {'computed' if computed else 'cached'} |")
    n = len(reports)
    optimised = sum(r["timings"]["optimised"] for r in reports)
    overhead = wall - optimised
    inside = {k: statistics.median(r["timings"][k] for r in reports) for k in ("loaded", "targets", "encoded")}
    print()
    print("| figure | value |\n| --- | --- |")
    print(f"| batch wall clock (first start -> last landing) | {wall:.1f} s |")
    print(f"| jobs per hour | {n / wall * 3600:.0f} |")
    print(f"| optimisation, per job (mean) | {optimised / n:.2f} s |")
    print(f"| overhead, per job (wall share - optimisation) | {overhead / n:.2f} s |")
    print(f"| overhead / job time | {overhead / wall:.1%} |")
    print(f"| of which decode / targets / encode (medians) | {inside['loaded']:.2f} / {inside['targets']:.2f} / "
          f"{inside['encoded']:.2f} s |")
    print(f"| style targets computed | {misses} time(s) for {n} jobs |")
    return 0 if n == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
