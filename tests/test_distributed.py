"""queue.backend celery end to end: a real redis-server, the real intake (`nstd run`) and real
`nstd worker` processes on the CPU with tiny jobs, and real faults: kill -9 of a worker, a worker
stopped past its lease, a forced redelivery, Redis killed and restarted without its data."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import REDIS_SERVER, Redis, Workers
from harness import Daemon

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

LEASE = 3.0


@pytest.fixture
def redis_server(tmp_path):
    if not Path(REDIS_SERVER).exists():
        if os.environ.get("NSTD_REQUIRE_REDIS"):
            pytest.fail("redis-server is required here (NSTD_REQUIRE_REDIS) and is not installed")
        pytest.skip("redis-server is not installed (`make redis`; .ci/run installs it)")
    r = Redis(tmp_path / "redis").start()
    yield r
    r.stop()


class Cluster:
    def __init__(self, tmp: Path, redis: Redis, **sections):
        queue = {"backend": "celery", "broker": redis.url, "lease_seconds": LEASE, "visibility_seconds": 600,
                 **sections.pop("queue", {})}
        self.redis = redis
        self.intake = Daemon(tmp, queue=queue, service={"checkpoint_every": 5}, **sections)
        self.workers = Workers(tmp, self.intake.config)

    def record(self, name: str) -> dict:
        try:
            return json.loads((self.intake.state / "workers" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def running(self, name: str) -> tuple[str | None, int]:
        run = self.record(name).get("running") or {}
        return run.get("name"), int(run.get("step", 0))

    def wait(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.intake.proc is not None and self.intake.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- intake\n{self.intake.logs()[-3000:]}\n"
                             f"{self.workers.logs()}")

    def up(self, *workers: str) -> None:
        """The intake, then these workers, ready to take jobs."""
        self.intake.start()
        for name in workers:
            self.workers.start(name)
        self.wait_idle(*workers)

    def wait_idle(self, *names: str, timeout: float = 90) -> None:
        self.wait(lambda: all(self.record(n).get("state") == "idle" for n in names), timeout,
                  f"workers {names} to be ready")

    def job_log(self, name: str, where: str = "outbox") -> str:
        return (self.intake.root / where / name / "job.log").read_text()

    def report(self, name: str) -> dict:
        return json.loads((self.intake.outbox / name / "report.json").read_text())

    def close(self) -> None:
        self.workers.stop_all()
        self.intake.stop()


@pytest.fixture
def cluster(tmp_path, redis_server):
    c = Cluster(tmp_path, redis_server)
    yield c
    c.close()


def drop(c: Cluster, name: str, steps: int = 2, priority: int = 0) -> None:
    c.intake.drop(name, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": steps,
                         "priority": priority})


def started_order(c: Cluster, names: list[str]) -> list[str]:
    """Jobs by the time their first attempt started (job.log's first 'started' line)."""
    def when(n):
        line = next(line for line in c.job_log(n).splitlines() if "started (attempt" in line)
        return line.split(" | ")[0]
    return sorted(names, key=when)


def test_jobs_spread_over_workers_each_delivered_once_and_status_lists_workers(tmp_path, redis_server):
    c = Cluster(tmp_path, redis_server, web={"enabled": True, "listen": "127.0.0.1:0"})
    try:
        _spread(c)
    finally:
        c.close()


def _spread(c: Cluster) -> None:
    import urllib.request

    c.up("a", "b")
    names = [f"j{i}" for i in range(6)]
    for n in names:
        drop(c, n, steps=15)
    c.wait(lambda: all(c.intake.landed(n) for n in names), 120, "every job in the outbox")
    c.intake.wait_state_clean()
    assert c.intake.audit(settled=False) == []
    ran_on = {n: re.search(r"worker (\w+) on", c.job_log(n)).group(1) for n in names}
    assert set(ran_on.values()) == {"a", "b"}, ran_on
    assert all(c.report(n)["attempts"] == 1 for n in names)
    out = subprocess.run([sys.executable, "-m", "nstd.cli", "status", "--config", str(c.intake.config)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "workers: 2" in out.stdout
    for n in ("a", "b"):
        assert re.search(rf"  {n} on \S+, cpu \(.*\): idle; heard from \d+ s ago; \d+ done, 0 failed", out.stdout), out.stdout
    assert sum(c.record(n)["done"] for n in ("a", "b")) == 6
    c.intake.wait(lambda: (c.intake.status() or {}).get("web"), 30, "the page's address")
    with urllib.request.urlopen(c.intake.status()["web"], timeout=30) as r:
        page = r.read().decode()
    assert "<h2>Workers (2)</h2>" in page and "<strong>a</strong>" in page and "<strong>b</strong>" in page, page
    assert "<h2>Running</h2>" not in page
    with urllib.request.urlopen(c.intake.status()["web"] + "status.json", timeout=30) as r:
        assert sorted(w["name"] for w in json.loads(r.read())["workers"]) == ["a", "b"]


def test_priority_order_holds_across_the_cluster(cluster):
    c = cluster
    c.intake.start()
    jobs = [("low", 0), ("high1", 5), ("mid", 3), ("high2", 5), ("neg", -2)]
    for name, priority in jobs:
        drop(c, name, priority=priority)
        time.sleep(0.05)  # arrival order breaks the tie between high1 and high2
    c.wait(lambda: len((c.intake.status() or {}).get("queue", [])) == 5, 30, "five jobs claimed")
    assert c.intake.status()["queue"] == ["high1", "high2", "mid", "low", "neg"]
    assert c.redis.llen("nstd") == 5  # one message each, while no worker runs
    c.workers.start("a")
    c.wait(lambda: all(c.intake.landed(n) for n, _ in jobs), 120, "every job in the outbox")
    assert started_order(c, [n for n, _ in jobs]) == ["high1", "high2", "mid", "low", "neg"]


def test_killed_workers_jobs_resume_elsewhere_from_their_checkpoint_then_crash_loops_are_quarantined(cluster):
    c = cluster
    c.intake.write_config(queue={"max_attempts": 2})
    c.up("a")
    drop(c, "doomed", steps=400)
    c.wait(lambda: c.running("a")[1] >= 20, 60, "a to run doomed past step 20")
    c.workers.kill("a")  # attempt 1 ends with a kill -9
    c.workers.start("b")
    c.wait(lambda: c.running("b")[0] == "doomed" and c.running("b")[1] >= 25, 90, "b to resume doomed")
    log = (c.intake.state / "jobs").glob("*/job.log")
    text = next(log).read_text()
    step = int(re.search(r"resuming from the checkpoint at step (\d+)", text).group(1))
    assert step >= 15  # from a's checkpoint, not from the start
    assert "started (attempt 2) on cpu (worker b on" in text
    c.workers.kill("b")  # attempt 2 ends with a kill -9: max_attempts reached
    c.workers.start("c")
    c.intake.wait_quarantined("doomed", timeout=90)
    error = c.intake.error("doomed")
    assert error["kind"] == "crashed" and error["attempts"] == 2, error
    assert "workers stopped during this job 2 times" in error["message"]
    drop(c, "fine", steps=5)  # the worker that judged it goes on with the next job
    c.intake.wait_landed("fine")
    c.intake.wait_state_clean()
    assert c.intake.audit(settled=False) == []


def force_redelivery(url: str) -> int:
    """What Redis does after visibility_seconds, now: every message a worker holds unacknowledged
    goes back to the queue (kombu's own restore, with a visibility timeout of 0)."""
    from kombu import Connection

    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        qos = conn.default_channel.qos
        before = conn.default_channel.client.hlen(qos.unacked_key)
        qos.restore_visible(interval=1)
        return before


def test_redelivered_and_stolen_jobs_are_delivered_once(cluster):
    c = cluster
    c.up("a", "b")
    drop(c, "long", steps=600)
    c.wait(lambda: any(c.running(n)[0] == "long" and c.running(n)[1] >= 10 for n in "ab"), 60, "long to run")
    first = "a" if c.running("a")[0] == "long" else "b"
    other = "b" if first == "a" else "a"
    # 1. The broker hands the running job's message out again: the other worker finds it leased.
    assert force_redelivery(c.redis.url) == 1
    c.wait(lambda: "nothing to take" in c.workers.log(other), 30, f"{other} to take the redelivered message and leave the job alone")
    assert c.running(first)[0] == "long" and c.running(other)[0] is None
    # 2. The first worker stalls past its lease: the job goes to the other; when the first wakes
    #    up it finds its lease gone and stops without touching the job.
    proc = c.workers.procs[first]
    proc.send_signal(signal.SIGSTOP)
    try:
        c.wait(lambda: c.running(other)[0] == "long", LEASE + 30, f"{other} to take over the stalled job")
    finally:
        proc.send_signal(signal.SIGCONT)
    c.intake.wait_landed("long", timeout=120)
    c.intake.wait_state_clean()
    c.wait(lambda: "was lost" in c.workers.log(first), 30, f"{first} to notice its lease was lost")
    assert c.intake.audit(settled=False) == []
    assert [p.name for p in c.intake.outbox.iterdir()] == ["long"]
    log = c.job_log("long")
    assert f"(worker {other} on" in log and "resuming from the checkpoint" in log


def test_a_redis_restart_loses_no_job(cluster):
    c = cluster
    c.up("a")
    names = [f"r{i}" for i in range(4)]
    for n in names:
        drop(c, n, steps=60)
    c.wait(lambda: c.running("a")[0] is not None, 60, "a job to run")
    assert c.redis.llen("nstd") >= 1
    c.redis.restart(down_seconds=2.0)  # killed: the queued messages are gone
    c.wait(lambda: all(c.intake.landed(n) for n in names), 180, "every job in the outbox after the restart")
    c.intake.wait_state_clean()
    assert c.intake.audit(settled=False) == []
    logs = c.intake.logs()
    assert "cannot be reached" in logs and "the broker is back" in logs


def test_cancel_in_a_cluster(cluster):
    c = cluster
    c.up("a")
    drop(c, "long", steps=2000, priority=1)
    drop(c, "queued", steps=2)
    c.wait(lambda: c.running("a")[0] == "long", 60, "long to run")

    def cancel(name):
        out = subprocess.run([sys.executable, "-m", "nstd.cli", "cancel", name, "--config", str(c.intake.config)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "moved to" in cancel("queued")  # nobody held it: the intake quarantines it
    assert c.intake.error("queued")["stage"] == "queue"
    assert "moved to" in cancel("long")  # its worker stops it at its next step
    error = c.intake.error("long")
    assert error["kind"] == "cancelled" and error["stage"] == "run", error
    c.intake.wait(lambda: not list((c.intake.state / "cancel").iterdir()), 10, "the requests answered")
    c.wait(lambda: c.record("a").get("state") == "idle", 30, "a idle again")
    assert c.intake.audit(settled=False) == []


def test_load_ci_sized(tmp_path, redis_server):
    """bench/cluster_load.py's scenario, small: 20 jobs over 3 workers, two kill -9s mid-job and a
    Redis restart; every job delivered exactly once and the folders' audit clean."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from cluster_load import run_load

    result = run_load(tmp_path, redis_server, jobs=20, workers=3, kills=2, redis_restarts=1, steps=20)
    assert result["problems"] == [], result
    assert result["delivered"] == 20 and result["quarantined"] == 0, result
    assert result["kills"] == 2 and result["redis_restarts"] == 1
    assert result["attempts_over_1"] >= 1  # a killed worker's job ran again


def test_a_stopped_worker_gives_its_job_back_to_another(cluster):
    c = cluster
    c.intake.write_config(service={"shutdown_grace_seconds": 0})
    c.up("a")
    drop(c, "long", steps=300)
    c.wait(lambda: c.running("a")[1] >= 12, 60, "a to run long")
    proc = c.workers.procs["a"]
    proc.send_signal(signal.SIGTERM)  # systemctl stop: Celery's warm shutdown
    assert proc.wait(60) == 0
    assert c.record("a")["state"] == "stopped"
    c.workers.start("b")
    c.intake.wait_landed("long", timeout=120)
    report = c.report("long")
    assert report["attempts"] == 1  # an orderly stop is not a crash
    assert report["resumed_from_step"] >= 10
    assert "stopped at step" in c.job_log("long") and "(worker b on" in c.job_log("long")


#: A time.time() for a worker's process that adds the seconds written in a file (read every
#: 0.2 s): its wall clock, stepped while it runs, as NTP or an operator does. Installed as
#: sitecustomize, so the whole process (Celery and kombu too) sees the same wrong time.
FAKE_WALL_CLOCK = '''
import os, time
_path = os.environ.get("NSTD_TEST_CLOCK_FILE")
if _path:
    _real, _state = time.time, [0.0, -1.0]

    def _time():
        now = time.monotonic()
        if now >= _state[1]:
            _state[1] = now + 0.2
            try:
                _state[0] = float(open(_path).read() or 0)
            except (OSError, ValueError):
                pass
        return _real() + _state[0]

    time.time = _time
'''


def send_message(c: Cluster, hint: str) -> None:
    from nstd.config import load_config
    from nstd.distributed.broker import Broker

    broker = Broker(load_config(c.intake.config))
    try:
        broker.send(hint)
    finally:
        broker.close()


def test_no_workers_clock_step_either_way_takes_a_running_job_or_keeps_a_dead_ones(cluster, tmp_path):
    c = cluster
    site = tmp_path / "fake-clock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_WALL_CLOCK)
    offsets = {n: tmp_path / f"clock-{n}" for n in "ab"}
    c.intake.start()
    for n, path in offsets.items():
        path.write_text("0")
        c.workers.start(n, env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                                "NSTD_TEST_CLOCK_FILE": str(path)})
    c.wait_idle("a", "b")
    drop(c, "long", steps=600)
    c.wait(lambda: any(c.running(n)[0] == "long" and c.running(n)[1] >= 10 for n in "ab"), 60, "long to run")
    holder = "a" if c.running("a")[0] == "long" else "b"
    other = "b" if holder == "a" else "a"
    for ahead in (100, -100):
        # The holder's clock steps one way, the other's the other way: by wall clocks, its lease
        # was renewed 200 s ago, or 200 s in the future.
        offsets[holder].write_text(str(-ahead))
        offsets[other].write_text(str(ahead))
        said = c.workers.log(other).count("nothing to take")
        send_message(c, "long")  # as a redelivery would: the other worker gets a message for it
        c.wait(lambda: c.workers.log(other).count("nothing to take") > said, 30, f"{other} to leave the job alone")
        step = c.running(holder)[1]
        time.sleep(3 * LEASE)  # three leases of the intake and both workers looking
        assert c.running(holder)[0] == "long" and c.running(holder)[1] > step and c.running(other)[0] is None
    # The holder dies with its clock 100 s ahead: its last renewal reads as 100 s in the future.
    offsets[holder].write_text("100")
    offsets[other].write_text("0")
    time.sleep(1)
    c.workers.kill(holder)
    t0 = time.monotonic()
    c.wait(lambda: c.running(other)[0] == "long", LEASE + 20, f"{other} to take over the dead worker's job")
    assert time.monotonic() - t0 < 60  # not the 100 s its wall clock claimed
    c.intake.wait_landed("long", timeout=180)
    log = c.job_log("long")
    assert log.count("started (attempt") == 2 and f"(worker {other} on" in log
    assert "was lost" not in c.workers.log(holder)
    assert c.intake.audit(settled=False) == []
