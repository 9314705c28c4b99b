"""kill -9 in the middle of a job: after a restart the job lands exactly once."""
import json
import os

from harness import Daemon

LONG = {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "size": 64, "steps": 400}


def running(d, name):
    run = (d.status() or {}).get("running") or {}
    return run.get("name") == name and run.get("step", 0) >= 2


def test_kill_9_during_a_job_then_restart(tmp_path):
    d = Daemon(tmp_path, service={"checkpoint_every": 5})
    d.start()
    d.drop("long", {**LONG, "steps": 40})
    d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 7, 60, "a checkpoint")
    d.kill()
    assert not d.landed("long") and os.listdir(d.state / "jobs")
    d.start()
    try:
        d.wait_landed("long")
        assert os.listdir(d.outbox) == ["long"] and os.listdir(d.quarantine) == []
        d.wait_state_clean()
        assert os.listdir(d.inbox) == []
        report = json.loads((d.outbox / "long" / "report.json").read_text())
        assert report["attempts"] == 2
        k = report["resumed_from_step"]
        assert k and k % 5 == 0 and report["steps_run"] == 40 - k  # resumed from the last checkpoint
        log = (d.outbox / "long" / "job.log").read_text()
        assert "started (attempt 1)" in log and "started (attempt 2)" in log
    finally:
        d.stop()


def test_a_job_that_keeps_crashing_the_daemon_is_quarantined(tmp_path):
    d = Daemon(tmp_path, queue={"max_attempts": 2})
    d.start()
    d.drop("doomed", LONG)
    for _ in range(2):
        d.wait(lambda: running(d, "doomed"), 60, "the job to run")
        d.kill()
        d.start()
    d.drop("next", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1})
    try:
        d.wait_quarantined("doomed")
        err = d.error("doomed")
        assert err["kind"] == "crashed" and err["attempts"] == 2
        assert sorted(os.listdir(d.quarantine / "doomed")) == [
            "doomed.yaml", "error.yaml", "hoovertowernight.jpg", "job.log", "starry_night.jpg"]
        d.wait_landed("next")
    finally:
        d.stop()
