"""Load on the cluster: many tiny jobs over several `nstd worker`s, with kill -9s and Redis restarts.

    .venv/bin/python bench/cluster_load.py                      # 200 jobs, 3 workers, 2 kills, 1 restart
    .venv/bin/python bench/cluster_load.py --jobs 50 --kills 4 --redis-restarts 2
    .venv/bin/python bench/cluster_load.py --jobs 100 --kills 0 --redis-restarts 0 --baseline

Everything is real: Debian's redis-server (without persistence, so a restart loses what it held),
the intake (`nstd run`) and the workers as subprocesses on the CPU, faults while jobs run. At the
end the folders are audited (nstd/audit.py): every job must be in the outbox exactly once, with
nothing left in state and no user file lost. Prints a JSON summary; exits 1 on any problem.
tests/test_distributed.py runs the same scenario CI-sized.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import Redis, Workers  # noqa: E402
from harness import Daemon  # noqa: E402

LEASE = 3.0


def run_load(tmp: Path, redis: Redis, jobs: int = 200, workers: int = 3, kills: int = 2, redis_restarts: int = 1,
             steps: int = 20, timeout: float = 3600, seed: int = 0) -> dict:
    rng = random.Random(seed)
    # Two kills may hit the same job (each picks a busy worker): let it survive every fault, or it
    # is rightly quarantined as "crashed" and the run says so.
    intake = Daemon(tmp, queue={"backend": "celery", "broker": redis.url, "lease_seconds": LEASE,
                                "visibility_seconds": 60, "max_attempts": kills + 1},
                    service={"checkpoint_every": 5}, logging={"level": "INFO"})
    pool = Workers(tmp, intake.config)
    names = [f"w{i}" for i in range(workers)]
    intake.start()
    for n in names:
        pool.start(n)
    t0 = time.monotonic()
    jobs_names = [f"load{i:04d}" for i in range(jobs)]
    for i, name in enumerate(jobs_names):
        intake.drop(name, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": steps,
                           "priority": rng.choice([0, 0, 0, 1, 5])})
    finished = lambda: sum(intake.landed(n) or intake.quarantined(n) for n in jobs_names)  # noqa: E731
    # Faults spread over the run: each when that share of the jobs is finished.
    faults = sorted([((k + 1) / (kills + 1) * 0.8, "kill") for k in range(kills)] +
                    [((k + 1) / (redis_restarts + 1) * 0.9 + 0.02, "redis") for k in range(redis_restarts)])
    done_kills = done_restarts = 0
    deadline = time.monotonic() + timeout
    while finished() < jobs and time.monotonic() < deadline:
        if faults and finished() >= faults[0][0] * jobs:
            _, what = faults.pop(0)
            if what == "kill":
                victim = _busy_worker(intake, names, pool, deadline)
                pool.kill(victim)
                pool.start(victim)  # as systemd's Restart= would
                done_kills += 1
            else:
                redis.restart(down_seconds=1.0)
                done_restarts += 1
        time.sleep(0.1)
    took = time.monotonic() - t0
    intake.wait(lambda: not any(p for p in (intake.state / "jobs").iterdir() if not p.name.startswith(".")),
                120, "state/jobs to empty")
    pool.stop_all()
    intake.stop()
    problems = intake.audit(settled=True)
    missing = [n for n in jobs_names if not (intake.landed(n) or intake.quarantined(n))]
    problems += [f"{n}: neither delivered nor quarantined" for n in missing]
    reports = [json.loads((intake.outbox / n / "report.json").read_text()) for n in jobs_names if intake.landed(n)]
    return {
        "jobs": jobs, "workers": workers, "steps": steps, "kills": done_kills, "redis_restarts": done_restarts,
        "delivered": len(reports), "quarantined": sum(intake.quarantined(n) for n in jobs_names),
        "attempts_over_1": sum(r["attempts"] > 1 for r in reports),
        "resumed_from_checkpoint": sum(bool(r.get("resumed_from_step")) for r in reports),
        "seconds": round(took, 1), "jobs_per_hour": round(jobs / took * 3600),
        "problems": problems,
    }


def run_local(tmp: Path, jobs: int, steps: int, seed: int = 0) -> dict:
    """The baseline: the same jobs through `nstd run` alone (queue.backend local, one worker)."""
    rng = random.Random(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    intake = Daemon(tmp, service={"checkpoint_every": 5}, logging={"level": "INFO"})
    intake.start()
    t0 = time.monotonic()
    names = [f"load{i:04d}" for i in range(jobs)]
    for name in names:
        intake.drop(name, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": steps,
                           "priority": rng.choice([0, 0, 0, 1, 5])})
    intake.wait(lambda: all(intake.landed(n) for n in names), 3600, "every job delivered")
    took = time.monotonic() - t0
    intake.stop()
    return {"seconds": round(took, 1), "jobs_per_hour": round(jobs / took * 3600), "problems": intake.audit()}


def _busy_worker(intake: Daemon, names: list[str], pool: Workers, deadline: float) -> str:
    """A worker in the middle of a job, past its first checkpoint if it can be caught there."""
    end = min(deadline, time.monotonic() + 60)
    while time.monotonic() < end:
        for n in names:
            try:
                rec = json.loads((intake.state / "workers" / f"{n}.json").read_text())
            except (OSError, ValueError):
                continue
            run = rec.get("running") or {}
            # `job` is written at once when a job is taken and cleared when it is done; `running`
            # (the step) at most once a second: both must name the same job.
            if (rec.get("job") and run.get("name") == rec.get("job") and run.get("step", 0) >= 6
                    and pool.procs[n].poll() is None and rec.get("pid") == pool.procs[n].pid):
                return n
        time.sleep(0.01)
    return names[0]


def main() -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--redis-restarts", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep", help="folder to run in (kept); default a temporary one")
    p.add_argument("--baseline", action="store_true", help="also run the same jobs through `nstd run` alone "
                   "(queue.backend local) in this invocation, and print the ratio")
    args = p.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="nstd-cluster-load-"))
    tmp.mkdir(parents=True, exist_ok=True)
    redis = Redis(tmp / "redis").start()
    try:
        result = run_load(tmp, redis, args.jobs, args.workers, args.kills, args.redis_restarts, args.steps)
    finally:
        redis.stop()
    if args.baseline:
        local = run_local(tmp / "baseline", args.jobs, args.steps)
        result["baseline_local"] = local
        result["ratio_jobs_per_hour_cluster_over_local"] = round(result["jobs_per_hour"] / local["jobs_per_hour"], 2)
        result["problems"] += [f"baseline: {p}" for p in local["problems"]]
    print(json.dumps(result, indent=1))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
