"""The cluster's pieces that need no broker: leases, the work list, the intake's recovery, config."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from nstd.config import ConfigError, load_config
from nstd.daemon.claim import Claim, Input, StyleInput, Times
from nstd.distributed import board, lease


def claim(jobs: Path, job_id: str, priority: int = 0, arrived: float = 0.0) -> Claim:
    folder = jobs / job_id
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "a.jpg").write_bytes(b"x")
    c = Claim(id=job_id, name=f"name-{job_id}", content=Input("a.jpg", "a.jpg"), styles=[StyleInput("a.jpg", "a.jpg")],
              sidecar=Input("j.yaml", "j.yaml"), settings={"priority": priority},
              times=Times(first_seen=arrived, arrived=arrived, claimed=arrived), folder=folder)
    c.save()
    return c


def test_a_lease_is_exclusive_until_it_expires_or_is_released(tmp_path):
    job = claim(tmp_path, "j1").folder
    first = lease.Lease.acquire(job, "a", lease_seconds=60)
    assert first is not None and first.held()
    assert lease.Lease.acquire(job, "b", lease_seconds=60) is None  # live: nobody else
    assert first.renew()
    first.release()
    second = lease.Lease.acquire(job, "b", lease_seconds=60)
    assert second is not None and second.number == first.number + 1
    assert not first.held() and not first.renew()  # the fence: a newer lease exists
    assert lease.current(job).holder == "b"


def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced(tmp_path):
    job = claim(tmp_path, "j1").folder
    stalled = lease.Lease.acquire(job, "a", lease_seconds=60)
    record = json.loads(stalled.path.read_text())
    record["renewed_at"] = time.time() - 120  # it stopped renewing two minutes ago
    stalled.path.write_text(json.dumps(record))
    assert lease.free(job, lease_seconds=60)
    taker = lease.Lease.acquire(job, "b", lease_seconds=60)
    assert taker is not None
    assert not stalled.held() and not stalled.renew()
    assert taker.held()
    stalled.release()  # a no-op: it is not the holder
    assert lease.current(job).record["token"] == taker.record["token"] and not lease.current(job).record["released"]


def test_two_takers_racing_for_one_number_get_one_lease(tmp_path, monkeypatch):
    job = claim(tmp_path, "j1").folder
    # Both read "no lease" before either links: the second link finds the number taken.
    real_current = lease.current
    monkeypatch.setattr(lease, "current", lambda d: None)
    a = lease.Lease.acquire(job, "a", 60)
    b = lease.Lease.acquire(job, "b", 60)
    monkeypatch.setattr(lease, "current", real_current)
    assert (a is None) != (b is None)
    assert not [n for n in os.listdir(job / "lease") if n.startswith(".")]  # no temporary file left


def test_no_lease_on_a_job_that_left_state(tmp_path):
    job = claim(tmp_path, "j1").folder
    import shutil

    shutil.rmtree(job)
    assert lease.Lease.acquire(job, "a", 60) is None
    assert not job.exists()  # never made again


def test_an_unreadable_lease_counts_as_taken(tmp_path):
    job = claim(tmp_path, "j1").folder
    (job / "lease").mkdir()
    (job / "lease" / "000001.json").write_text("{not json")
    assert not lease.free(job, 60)
    assert lease.Lease.acquire(job, "a", 60) is None


def test_the_board_orders_by_priority_then_arrival_and_skips_held_and_leased(tmp_path):
    claim(tmp_path, "20260101-000000-aaaaaaaa", priority=0, arrived=1)
    claim(tmp_path, "20260101-000000-bbbbbbbb", priority=5, arrived=3)
    claim(tmp_path, "20260101-000000-cccccccc", priority=5, arrived=2)
    claim(tmp_path, "20260101-000000-dddddddd", priority=9, arrived=4)
    (tmp_path / ".nstd-tmp-x").mkdir()  # a claim being made is not a job
    (tmp_path / "leftover").mkdir()  # nor a folder without a record
    assert [e.id[-1] for e in board.scan(tmp_path)] == ["d", "c", "b", "a"]
    lease.Lease.acquire(tmp_path / "20260101-000000-dddddddd", "w", 60)
    board.hold(tmp_path / "20260101-000000-cccccccc", time.time() + 30, "test")
    assert [e.id[-1] for e in board.takeable(tmp_path, 60)] == ["b", "a"]
    board.unhold(tmp_path / "20260101-000000-cccccccc")
    assert [e.id[-1] for e in board.takeable(tmp_path, 60)] == ["c", "b", "a"]


def test_intake_recovery_in_a_cluster_leaves_the_workers_moves_alone(tmp_path):
    from nstd.daemon.store import Folders, Store
    from nstd.daemon.transfer import Transfer

    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    job = claim(folders.jobs, "20260101-000000-aaaaaaaa")
    t = Transfer(folders.outbox, job.id)  # a worker delivering it, right now
    t.put(job.path(job.content), "inputs/a.jpg")
    own = Transfer(folders.quarantine, "0123456789ab")  # the intake's own, from the inbox
    assert Store(folders).recover(cluster=True) == []
    assert t.dir.is_dir() and (t.dir / "inputs" / "a.jpg").is_file()  # untouched
    assert not own.dir.exists()  # rolled back
    assert job.folder.is_dir()  # no inputs now, but not removed: its worker holds it


def test_config_celery_needs_a_broker(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"queue": {"backend": "celery"}}))
    with pytest.raises(ConfigError, match="queue.broker"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump({"queue": {"backend": "celery", "broker": "http://x"}}))
    with pytest.raises(ConfigError, match="Redis URL"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump({"queue": {"backend": "celery", "broker": "redis://h:6379/0", "name": "a b"}}))
    with pytest.raises(ConfigError, match="queue.name"):
        load_config(cfg)
    cfg.write_text(yaml.safe_dump({"queue": {"backend": "celery", "broker": "redis://h:6379/0"}}))
    assert load_config(cfg)["queue"]["lease_seconds"] == 60


def test_status_lists_workers_with_their_heartbeat(tmp_path):
    from nstd.daemon.status import describe, workers

    (tmp_path / "workers").mkdir()
    now = time.time()
    base = {"host": "gpu1", "device": "cuda:0", "device_name": "H100", "done": 3, "failed": 1, "state": "running",
            "started_at": now - 600, "pid": 5}
    (tmp_path / "workers" / "a.json").write_text(json.dumps({**base, "name": "a", "updated_at": now - 2,
                                                             "running": {"name": "job7", "step": 40, "steps": 300}}))
    (tmp_path / "workers" / "b.json").write_text(json.dumps({**base, "name": "b", "host": "gpu2", "updated_at": now - 300}))
    (tmp_path / "workers" / "old.json").write_text(json.dumps({**base, "name": "old", "updated_at": now - 3 * 86400}))
    found = workers(tmp_path, now)
    assert [w["name"] for w in found] == ["a", "b"]
    status = {"pid": 1, "state": "running", "started_at": now - 60, "updated_at": now, "backend": "celery",
              "queue": ["job8"], "waiting": [], "done": 0, "failed": 0}
    text, alive = describe(status, now=now, lock_held=True, workers=found, lease_seconds=60)
    assert "a on gpu1, cuda:0 (H100): running job7 step 40/300; heard from 2 s ago; 3 done, 1 failed" in text
    assert "b on gpu2, cuda:0 (H100): SILENT for 5 min" in text
    assert "queued: 1 (job8)" in text and "running: nothing" not in text
