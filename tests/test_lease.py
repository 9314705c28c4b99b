"""The cluster's pieces that need no broker: leases, the work list, the intake's recovery, config."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from nstd.config import ConfigError, load_config
from nstd.state.claim import Claim, Input, StyleInput, Times
from nstd.distributed import board, lease


class FakeClock:
    """This process's monotonic clock, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(lease, "_clock", fake)
    monkeypatch.setattr(lease, "SIGHTINGS", lease.Sightings())
    return fake


def claim(jobs: Path, job_id: str, priority: int = 0, arrived: float = 0.0) -> Claim:
    folder = jobs / job_id
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "a.jpg").write_bytes(b"x")
    c = Claim(id=job_id, name=f"name-{job_id}", content=Input("a.jpg", "a.jpg"), styles=[StyleInput("a.jpg", "a.jpg")],
              sidecar=Input("j.yaml", "j.yaml"), settings={"priority": priority},
              times=Times(first_seen=arrived, arrived=arrived, claimed=arrived), folder=folder)
    c.save()
    return c


def test_a_lease_is_exclusive_until_it_expires_or_is_released(tmp_path, clock):
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


def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced(tmp_path, clock):
    job = claim(tmp_path, "j1").folder
    stalled = lease.Lease.acquire(job, "a", lease_seconds=60)
    assert not lease.free(job, lease_seconds=60)
    clock.advance(59)
    assert not lease.free(job, lease_seconds=60)
    clock.advance(1.5)  # watched for a minute, unchanged: it stopped renewing
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


def test_an_unreadable_lease_counts_as_taken(tmp_path, clock):
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
    assert board.leftovers(tmp_path) == [tmp_path / "leftover"]
    assert [e.id[-1] for e in board.scan(tmp_path)] == ["d", "c", "b", "a"]
    lease.Lease.acquire(tmp_path / "20260101-000000-dddddddd", "w", 60)
    board.hold(tmp_path / "20260101-000000-cccccccc", 30, "test")
    assert [e.id[-1] for e in board.takeable(tmp_path, 60)] == ["b", "a"]
    board.unhold(tmp_path / "20260101-000000-cccccccc")
    assert [e.id[-1] for e in board.takeable(tmp_path, 60)] == ["c", "b", "a"]


def test_intake_recovery_in_a_cluster_leaves_the_workers_moves_alone(tmp_path):
    from nstd.state.folders import Folders
    from nstd.state.store import Store
    from nstd.state.transfer import Transfer

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
    from nstd.commands.status import describe
    from nstd.state.status import workers

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


def _nstd(*args: str, env: dict | None = None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "nstd.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_nstd_worker_refuses_what_it_cannot_run(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({"paths": {"root": str(tmp_path / "var")}}))
    r = _nstd("worker", "--config", str(local))
    assert r.returncode == 2 and "queue.backend is local" in r.stderr, r.stderr
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"paths": {"root": str(tmp_path / "unmounted")},
                                       "queue": {"backend": "celery", "broker": "redis://127.0.0.1:1/0"}}))
    r = _nstd("worker", "--config", str(cluster), "--device", "cpu")
    assert r.returncode == 2 and "is not there: mount the storage" in r.stderr, r.stderr
    assert not (tmp_path / "unmounted").exists()  # nothing made on the local disk
    r = _nstd("worker", "--config", str(cluster), "--device", "gpu0")
    assert r.returncode == 2 and "--device" in r.stderr
    r = _nstd("worker", "--config", str(cluster), "--name", "../x")
    assert r.returncode == 2 and "--name" in r.stderr


def test_a_lease_cut_short_by_a_crash_expires_when_watched_unchanged(tmp_path, clock):
    job = claim(tmp_path, "j1").folder
    (job / "lease").mkdir()
    empty = job / "lease" / "000001.json"
    empty.write_text("")  # a power loss before the data reached the disk
    assert not lease.free(job, 60)  # it may be being written
    clock.advance(30)
    empty.write_text("{")  # it was: the watch starts again, from when it is seen changed
    assert not lease.free(job, 60)
    clock.advance(59)
    assert not lease.free(job, 60)
    clock.advance(1.5)
    assert lease.free(job, 60)
    assert lease.Lease.acquire(job, "a", 60) is not None


def test_the_longer_of_two_lease_settings_wins_and_old_leases_are_pruned(tmp_path, clock):
    job = claim(tmp_path, "j1").folder
    first = lease.Lease.acquire(job, "a", lease_seconds=600)  # the holder's own setting
    assert lease.Lease.acquire(job, "b", lease_seconds=60) is None
    clock.advance(100)
    assert lease.Lease.acquire(job, "b", lease_seconds=60) is None  # 100 s < the holder's 600
    first.release()
    for n in range(5):
        lease.Lease.acquire(job, "a", 60).release()
    assert sorted(os.listdir(job / "lease")) == ["000005.json", "000006.json"]


def test_no_wall_clock_jump_takes_a_running_lease_or_keeps_a_dead_ones(tmp_path, monkeypatch, clock):
    """The holder's and the reader's wall clocks stepped 100 s either way, at every moment: only
    whether the record changes, as the reader watches on its own monotonic clock, decides."""
    job = claim(tmp_path, "j1").folder
    real = time.time
    holder = lease.Lease.acquire(job, "a", lease_seconds=10)
    for offset in (100, -100, 0, -100, 100) * 3:
        monkeypatch.setattr(time, "time", lambda: real() + offset)  # every clock in this process
        assert holder.renew()
        clock.advance(4)
        assert not lease.free(job, 10)
        assert lease.Lease.acquire(job, "b", 10) is None
    # Now the holder dies, its clock 100 s ahead: its last renewed_at lies in the reader's future.
    monkeypatch.setattr(time, "time", lambda: real() + 100)
    assert holder.renew()
    assert json.loads(holder.path.read_text())["renewed_at"] > real() + 90
    monkeypatch.setattr(time, "time", real)
    lease.current(job)
    clock.advance(9)
    assert not lease.free(job, 10)
    clock.advance(1.5)
    assert lease.free(job, 10)  # ten seconds watched without a beat, whatever renewed_at says
    assert lease.Lease.acquire(job, "b", 10) is not None and not holder.renew()


def test_a_hold_lasts_its_seconds_whatever_the_clocks(tmp_path, monkeypatch, clock):
    job = claim(tmp_path, "20260101-000000-aaaaaaaa")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 100)  # the worker that holds it is 100 s behind
    board.hold(job.folder, 30, "nstd could not move it")
    monkeypatch.setattr(time, "time", lambda: real() + 100)  # and the one that reads it 100 s ahead
    assert board.takeable(tmp_path, 60) == []
    clock.advance(29)
    assert board.takeable(tmp_path, 60) == []
    clock.advance(1.5)
    assert [e.id for e in board.takeable(tmp_path, 60)] == [job.id]


def test_sightings_are_bounded_and_a_forgotten_one_counts_again_from_zero(clock):
    seen = lease.Sightings(size=3)
    for n in range(5):
        assert seen.unchanged_for(f"k{n}", b"x") == 0
    clock.advance(10)
    assert seen.unchanged_for("k4", b"x") == 10
    assert seen.unchanged_for("k0", b"x") == 0  # forgotten: late, never early
    assert seen.unchanged_for("k4", b"y") == 0  # changed


def test_a_newer_lease_is_seen_even_when_the_listing_is_stale(tmp_path, monkeypatch, clock):
    job = claim(tmp_path, "j1").folder
    mine = lease.Lease.acquire(job, "a", 60)
    lease.current(job)
    clock.advance(61)
    assert lease.Lease.acquire(job, "b", 60) is not None
    monkeypatch.setattr(lease, "_numbers", lambda d: [1])  # an NFS client's cached listing
    assert not mine.held()


def folders_with_a_claim(tmp_path):
    from nstd.state.folders import Folders

    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    job = claim(folders.jobs, "20260101-000000-aaaaaaaa")
    (job.inputs_dir / "b.jpg").write_bytes(b"y")
    return folders, job


def test_a_stalled_workers_delivery_is_taken_from_it_not_shared(tmp_path):
    """B takes over while A is mid-delivery: A's transfer is renamed away and rolled back, and
    nothing A does after waking up can add to it, commit it or delete what came back."""
    from nstd.state.store import Store, drop_state_folder
    from nstd.state.transfer import Transfer

    folders, job = folders_with_a_claim(tmp_path)
    a = Transfer(folders.outbox, job.id)
    a.put(job.inputs_dir / "a.jpg", "inputs/a.jpg")  # A moved one input, then stalled
    assert Store(folders).reclaim(job.id) == 1  # B, holding the lease now
    assert sorted(os.listdir(job.inputs_dir)) == ["a.jpg", "b.jpg"]
    with pytest.raises(FileNotFoundError):
        a.put(job.inputs_dir / "b.jpg", "inputs/b.jpg")  # A wakes up
    with pytest.raises(FileNotFoundError):
        a.commit(folders.outbox / "name")
    assert os.listdir(folders.outbox) == []  # nothing made again, nothing committed
    drop_state_folder(job.folder)  # A's clean-up after a commit it believes in
    assert sorted(os.listdir(job.inputs_dir)) == ["a.jpg", "b.jpg"]  # a user's file is never deleted


def test_cancel_without_an_intake_respects_a_workers_lease_and_reclaims_a_dead_ones_move(tmp_path, clock):
    from nstd.commands import cancel
    from nstd.state.transfer import Transfer

    folders, job = folders_with_a_claim(tmp_path)
    from nstd.config import load_config

    cfg = load_config()
    cfg["paths"].update({k: str(getattr(folders, k)) for k in ("inbox", "outbox", "quarantine", "state", "logs")})
    cfg["queue"].update(backend="celery", lease_seconds=60)
    worker = lease.Lease.acquire(job.folder, "gpu1-cuda0", 60)
    said = str(cancel.cancel(cfg, job.name, wait_seconds=0.3))
    assert "asked its worker gpu1-cuda0" in said and job.folder.is_dir()  # the worker's to stop
    assert (folders.state / "cancel" / job.id).exists()
    os.unlink(folders.state / "cancel" / job.id)
    # The worker dies mid-delivery: one input is in its unfinished outbox folder.
    Transfer(folders.outbox, job.id).put(job.inputs_dir / "a.jpg", "inputs/a.jpg")
    clock.advance(61)  # watched (here, by this process) for a minute without a renewal: dead
    said = str(cancel.cancel(cfg, job.name, wait_seconds=0.3))
    assert "cancelled" in said and not job.folder.exists()
    error = yaml.safe_load((folders.quarantine / job.name / "error.yaml").read_text())
    assert sorted(error["files"]) == ["a.jpg", "b.jpg"]  # the dead worker's share came back too
    assert os.listdir(folders.outbox) == []


def test_a_retry_later_on_a_worker_is_not_counted_as_a_crash(tmp_path):
    from types import SimpleNamespace

    from nstd.distributed.node import NodeQueue

    folders, job = folders_with_a_claim(tmp_path)
    job.begin_attempt()
    held = lease.Lease.acquire(job.folder, "w", 60)
    NodeQueue(SimpleNamespace(lease=held, folders=folders)).put(job)
    assert Claim.from_folder(job.folder).attempts == 0
    assert lease.free(job.folder, 60)  # let go...
    assert board.takeable(folders.jobs, 60) == []  # ...but held back for a while


def test_a_cancel_seen_for_one_job_is_not_taken_for_the_next(tmp_path):
    from types import SimpleNamespace

    from nstd.distributed.node import NodeQueue
    from nstd.state import requests

    folders, job = folders_with_a_claim(tmp_path)
    q = NodeQueue(SimpleNamespace(folders=folders))
    requests.ask(folders.state, "job-x")
    assert q.is_cancelled("job-x")
    assert not q.is_cancelled("job-y")  # asked about another job: looked up again
    q.done("job-x")
    assert not q.is_cancelled("job-z")


def test_each_lease_moves_in_a_folder_of_its_own_and_a_stale_commit_never_lands(tmp_path):
    """A (lease 1) stalls before its commit; B (lease 2) reclaims and starts its own delivery;
    A wakes up: its folder is gone, B's is another, so A can neither commit nor touch B's."""
    from nstd.state.store import Store
    from nstd.state.transfer import Transfer

    folders, job = folders_with_a_claim(tmp_path)
    a = Transfer(folders.outbox, f"{job.id}-L1")
    a.put(job.inputs_dir / "a.jpg", "inputs/a.jpg")
    assert Store(folders).reclaim(job.id) == 1
    b = Transfer(folders.outbox, f"{job.id}-L2")
    b.put(job.inputs_dir / "a.jpg", "inputs/a.jpg")
    with pytest.raises(FileNotFoundError):
        a.commit(folders.outbox / "name")
    assert b.dir.is_dir() and (b.dir / "inputs" / "a.jpg").is_file()
    assert b.commit(folders.outbox / "name") == folders.outbox / "name"


def test_a_commit_never_replaces_a_folder_of_the_same_name(tmp_path):
    from nstd.state.transfer import Transfer

    (tmp_path / "name").mkdir()  # empty: a plain rename would replace it
    t = Transfer(tmp_path, "x")
    (t.dir / "result.png").write_bytes(b"p")
    assert t.commit(tmp_path / "name") == tmp_path / "name-2"
    assert os.listdir(tmp_path / "name") == []


def test_a_lease_folder_that_cannot_be_read_is_never_taken_for_free(tmp_path, monkeypatch):
    job = claim(tmp_path, "j1").folder
    held = lease.Lease.acquire(job, "a", 60)
    real = os.listdir

    def unreadable(path):
        if str(path).endswith("/lease"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(lease.os, "listdir", unreadable)
    with pytest.raises(OSError):
        lease.Lease.acquire(job, "b", 60)  # never "no lease, number 1 is free"
    assert not held.held()  # nor proof that it is still ours
    assert board.scan(tmp_path) == []  # the board leaves it alone


def test_a_released_lease_is_not_renewed_back_to_life(tmp_path):
    job = claim(tmp_path, "j1").folder
    held = lease.Lease.acquire(job, "a", 60)
    held.release()
    assert not held.renew()
    assert lease.current(job).record["released"]


def test_a_local_daemon_refuses_a_root_where_a_cluster_works(tmp_path):
    root = tmp_path / "var"
    (root / "state" / "workers").mkdir(parents=True)
    (root / "state" / "workers" / "gpu1-cuda0.json").write_text(json.dumps(
        {"name": "gpu1-cuda0", "host": "gpu1", "pid": 7, "state": "running", "updated_at": time.time(),
         "started_at": time.time() - 60}))
    cfg = tmp_path / "local.yaml"
    cfg.write_text(yaml.safe_dump({"paths": {"root": str(root)}, "engine": {"device": "cpu"}, "web": {"enabled": False}}))
    r = _nstd("run", "--until-empty", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "this root has a cluster at work (workers: gpu1-cuda0" in r.stderr
