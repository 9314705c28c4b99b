"""A full disk under the outbox (a real 256 KB tmpfs) and an outbox that cannot be written."""
import json
import os
import time

import yaml

from nstd.daemon import queue as queue_mod
from test_worker import claim, make_worker


def fill(folder):
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_full_outbox_quarantines_with_the_reason(tmp_path, monkeypatch, small_fs):
    """The disk fills while the job runs (the check before it starts is off: it would hold it)."""
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    w.cfg["limits"]["min_free_mb"] = 0
    outbox = small_fs / "outbox"
    outbox.mkdir()
    fill(small_fs)
    object.__setattr__(store.f, "outbox", outbox)
    job = claim(store, w.cfg["defaults"])
    w.process(job)
    err = yaml.safe_load((store.f.quarantine / "j" / "error.yaml").read_text())
    assert err["kind"] == "cannot write outbox" and "No space left on device" in err["message"]
    assert err["stage"] == "deliver"
    assert sorted(p.name for p in (store.f.quarantine / "j").iterdir()) == ["c.png", "error.yaml", "j.yaml", "job.log", "s.png"]
    assert sorted(os.listdir(outbox)) == []  # the half-written folder was rolled back
    assert os.listdir(store.f.jobs) == []


def test_when_nothing_can_be_written_the_job_waits_in_state_and_lands_later(tmp_path, monkeypatch, small_fs):
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    w.cfg["limits"]["min_free_mb"] = 0  # the disk filled while the job ran
    for name in ("outbox", "quarantine"):
        (small_fs / name).mkdir()
        object.__setattr__(store.f, name, small_fs / name)
    fill(small_fs)
    monkeypatch.setattr(queue_mod, "RETRY_SECONDS", 0.2)
    job = claim(store, w.cfg["defaults"])
    w.process(job)
    assert [p.name for p in store.f.jobs.iterdir()] == [job.id]  # still claimed, nothing lost
    assert sorted(os.listdir(job.inputs_dir)) == ["c.png", "j.yaml", "s.png"]
    assert os.listdir(small_fs / "outbox") == [] and os.listdir(small_fs / "quarantine") == []
    os.unlink(small_fs / "filler")  # space comes back
    time.sleep(0.3)
    again = w.queue.get(timeout=1)
    assert again is not None and again.id == job.id
    w.process(again)
    report = json.loads((small_fs / "outbox" / "j" / "report.json").read_text())
    assert report["status"] == "done"


def test_a_job_does_not_start_on_a_full_disk_it_waits_and_runs_once_there_is_room(tmp_path, monkeypatch, small_fs):
    """limits.min_free_mb: auto on a real full file system: the job is held before it starts (no
    attempt counted, nothing written, the reason in the status) and is tried again; once room is
    made (space freed, the operator's threshold met) it runs and lands."""
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    (small_fs / "outbox").mkdir()
    object.__setattr__(store.f, "outbox", small_fs / "outbox")
    fill(small_fs)
    from nstd.daemon import worker as worker_mod

    monkeypatch.setattr(worker_mod, "RETRY_SECONDS", 0.2)
    job = claim(store, w.cfg["defaults"])
    w.process(job)
    why = w.status.data["held"]["j"]
    assert why.startswith("waiting for disk space: 0 MiB free where the outbox is") and "plus 64 MiB" in why, why
    assert os.listdir(small_fs / "outbox") == [] and not (store.f.quarantine / "j").exists()
    assert json.loads((job.folder / "claim.json").read_text())["attempts"] == 0
    os.unlink(small_fs / "filler")  # space freed; a 256 KB disk is enough for this job
    w.cfg["limits"]["min_free_mb"] = 0  # the operator's threshold (SIGHUP), met by any free space
    again = w.queue.get(timeout=5)
    assert again is not None and again.id == job.id
    w.process(again)
    assert json.loads((small_fs / "outbox" / "j" / "report.json").read_text())["attempts"] == 1
    assert "j" not in w.status.data["held"]
