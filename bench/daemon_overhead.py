"""The daemon's cost outside the optimisation, on a batch of jobs that share one style.

Drops N jobs (different content pictures, one style file, GIF on) into a real daemon at once and
reads every report.json: decode, style targets, optimisation and encoding per job, the batch's
wall clock from the first start to the last landing, jobs per hour, and how often the style
targets were computed (once for the whole batch is the goal).

Then, in the same invocation, the bare engine does the same jobs back to back in this process:
one Engine with the daemon's engine settings, one style cache, each job's effective settings read
from its job.yaml in the outbox; per job it decodes the pictures and calls Engine.stylize (GIF
frames collected, as the daemon's are), and writes nothing. Its jobs per hour are the yardstick:
the issue's target is daemon >= 0.95x bare engine. `--rounds N` alternates the two N times (this
machine's noise; the order flips each round) and compares medians; `--no-baseline` runs the daemon alone.

    .venv/bin/python bench/daemon_overhead.py                               # CPU, 256 px, 30 steps
    .venv/bin/python bench/daemon_overhead.py --device cuda --size 512 --steps 300   # the issue's figure
    .venv/bin/python bench/daemon_overhead.py --rounds 3                   # alternate, medians

"Overhead" is everything in a job's share of the wall clock that is not the optimiser's loop:
decode, targets, GIF and result encoding, report, the move to the outbox and the hand-over from
one job to the next. Prints markdown tables; exits 1 if a job did not land.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from harness import IMAGES, Daemon  # noqa: E402

CONTENTS = ("tubingen.jpg", "hoovertowernight.jpg", "golden_gate.jpg", "shipwreck.jpg", "the_scream.jpg",
            "woman-with-hat-matisse.jpg")
STYLE = "starry_night.jpg"


def stamp(line: str) -> float:
    """Seconds since the epoch of a job.log line ("2026-11-25 03:21:19.123 | ...")."""
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float("0" + line[19:23])


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], float, list[dict]]:
    """Every job's report, the batch's wall clock from the first start to the last landing, and
    every job's effective settings (its job.yaml in the outbox)."""
    d = Daemon(workdir, engine={"device": args.device, "precision": args.precision},
               defaults={"size": args.size, "steps": args.steps, "stages": 1, "gif": {"every": args.gif_every}},
               logging={"level": "INFO"})
    import torch

    # The harness gives its daemons 2 threads (the suite's machine); here both sides get torch's own count.
    d.start(env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
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
        settings = [yaml.safe_load((d.outbox / name / "job.yaml").read_text()) for name in names]
        first = min(next(stamp(x) for x in (d.outbox / name / "job.log").read_text().splitlines()
                         if " started (attempt" in x) for name in names)
        last = max((d.outbox / name).stat().st_mtime for name in names)
    finally:
        d.stop()
    return reports, last - first, settings


def bare(args: argparse.Namespace, settings: list[dict], reports: list[dict]) -> tuple[float, list[tuple[float, float]]]:
    """The same jobs through the bare engine, back to back in this process: the batch's wall
    clock (decode + Engine.stylize, from the first job's decode to the last one's return; the
    Engine is built before, as the daemon's is before its first job) and each job's (seconds,
    seconds in the optimiser's loop)."""
    from nstd.config import load_config
    from nstd.engine import images
    from nstd.engine.stylize import Engine
    from nstd.engine.targets import StyleImage, TargetCache
    from nstd.job.spec import Job
    from nstd.daemon.worker import file_digest

    e = load_config(None)["engine"]
    engine = Engine(weights=e["weights"], weights_file=e["weights_file"], device=args.device,
                    precision=args.precision, lbfgs_history=e["lbfgs_history"], cuda_graphs=e["cuda_graphs"])
    cache = TargetCache()
    each = []
    t0 = time.perf_counter()
    for i, (job, report) in enumerate(zip(settings, reports)):
        t = time.perf_counter()
        content = images.open_image(IMAGES / CONTENTS[i % len(CONTENTS)])
        style = StyleImage(images.open_image(IMAGES / STYLE), 1.0, file_digest(IMAGES / STYLE))
        result = engine.stylize(content, [style], Job.of(job).params(), cache=cache,
                                budget_bytes=report.get("memory_budget_bytes"))
        assert result.steps == report["steps_total"], (result.steps, report["steps_total"])
        each.append((time.perf_counter() - t, result.timings["optimise"]))
    return time.perf_counter() - t0, each


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gif-every", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--timeout-per-job", type=float, default=600)
    ap.add_argument("--rounds", type=int, default=1, help="daemon and bare engine alternated this many times")
    ap.add_argument("--no-baseline", action="store_true", help="the daemon alone, no bare-engine run")
    args = ap.parse_args()
    walls, bare_walls, bare_each = [], [], []
    settings: list[dict] = []
    for i in range(args.rounds):
        # The bare engine needs the daemon's effective settings, so it follows the daemon in the
        # first round; after that the order flips each round (this machine drifts over minutes).
        first_bare = i % 2 == 1 and not args.no_baseline
        if first_bare:
            b_wall, each = bare(args, settings, reports)
        with tempfile.TemporaryDirectory(prefix="nstd-overhead-") as tmp:
            reports, wall, settings = run(args, Path(tmp))
        walls.append(wall)
        if not args.no_baseline and not first_bare:
            b_wall, each = bare(args, settings, reports)
        if not args.no_baseline:
            bare_walls.append(b_wall)
            bare_each.append(each)

    keys = ("loaded", "targets", "optimised", "encoded")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: {os.cpu_count()} cores, "
          f"device {reports[0]['device']} ({reports[0]['device_name']}), precision {reports[0]['precision']}, "
          f"CUDA graph {reports[0]['cuda_graph']}; {args.jobs} jobs, {args.size} px, {args.steps} steps, "
          f"GIF frame every {args.gif_every} step(s), one shared style; {args.rounds} round(s), the last one's jobs:\n")
    print("| job | size | " + " | ".join(f"{k} s" for k in keys) + " | style targets |"
          + (" bare engine s | bare engine optimised s |" if bare_each else ""))
    print("| --- | --- |" + " --- |" * (len(keys) + 1 + 2 * bool(bare_each)))
    misses = 0
    for i, r in enumerate(reports):
        t = r["timings"]
        computed = r["style_cache"]["misses"] > misses
        misses = r["style_cache"]["misses"]
        print(f"| {r['job']} | {r['size_used'][0]}x{r['size_used'][1]} | "
              + " | ".join(f"{t[k]:.2f}" for k in keys) + f" | {'computed' if computed else 'cached'} |"
              + (f" {bare_each[-1][i][0]:.2f} | {bare_each[-1][i][1]:.2f} |" if bare_each else ""))
    n = len(reports)
    wall = statistics.median(walls)
    optimised = sum(r["timings"]["optimised"] for r in reports)
    overhead = walls[-1] - optimised
    inside = {k: statistics.median(r["timings"][k] for r in reports) for k in ("loaded", "targets", "encoded")}
    print()
    print("| figure | value |\n| --- | --- |")
    print(f"| batch wall clock (first start -> last landing), median | {wall:.1f} s "
          f"({', '.join(f'{w:.1f}' for w in walls)}) |")
    print(f"| jobs per hour | {n / wall * 3600:.0f} |")
    print(f"| optimisation, per job (mean, last round) | {optimised / n:.2f} s |")
    print(f"| overhead, per job (wall share - optimisation, last round) | {overhead / n:.2f} s |")
    print(f"| overhead / job time (last round) | {overhead / walls[-1]:.1%} |")
    print(f"| of which decode / targets / encode (medians) | {inside['loaded']:.2f} / {inside['targets']:.2f} / "
          f"{inside['encoded']:.2f} s |")
    print(f"| style targets computed | {misses} time(s) for {n} jobs |")
    if bare_walls:
        b = statistics.median(bare_walls)
        print(f"| bare engine: batch wall clock, median | {b:.1f} s ({', '.join(f'{w:.1f}' for w in bare_walls)}) |")
        print(f"| bare engine: jobs per hour | {n / b * 3600:.0f} |")
        ratios = [bw / w for bw, w in zip(bare_walls, walls)]
        print(f"| daemon / bare engine, jobs per hour | {b / wall:.2f}x (target >= 0.95x); each round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)} |")
    return 0 if n == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
