"""The daemon under systemd's eyes: notify messages, SIGTERM with a grace time, resume, SIGHUP."""
import json
import signal
import socket
import threading
import time

import yaml

from harness import Daemon

LONG = {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "size": 64, "steps": 400}


def step_of(d, name):
    run = (d.status() or {}).get("running") or {}
    return run.get("step", 0) if run.get("name") == name else 0


def test_notify_ready_status_watchdog_stopping(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    messages, done = [], threading.Event()

    def listen():  # read as systemd does, all the time
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass

    listener = threading.Thread(target=listen)
    listener.start()
    d = Daemon(tmp_path)
    try:
        d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "900000"})
        d.drop("job", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1})
        d.wait_landed("job")
        time.sleep(1.5)
        assert d.stop() == 0
        time.sleep(0.5)
    finally:
        done.set()
        listener.join()
        d.stop()
    ready = [m for m in messages if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=" in ready[0]
    assert messages.index(ready[0]) < len(messages) - 1
    assert sum(m == "WATCHDOG=1" for m in messages) >= 3  # every 0.3 s while healthy
    assert any(m.startswith("STATUS=") and "done" in m for m in messages)
    stopping = [i for i, m in enumerate(messages) if "STOPPING=1" in m]
    assert stopping and all("READY=1" not in m for m in messages[stopping[0]:])


def test_sigterm_mid_job_stops_at_a_step_and_resumes_later(tmp_path):
    d = Daemon(tmp_path, service={"shutdown_grace_seconds": 0.5, "checkpoint_every": 5})
    d.start()
    d.drop("long", {**LONG, "size": 48, "steps": 60})
    d.wait(lambda: step_of(d, "long") >= 7, 60, "a few steps")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert time.monotonic() - t0 < 10
    assert not d.landed("long")
    [job_dir] = (d.state / "jobs").iterdir()
    claim = json.loads((job_dir / "claim.json").read_text())
    assert claim["attempts"] == 0  # an orderly stop is not a crash
    assert (job_dir / "checkpoint" / "checkpoint.pt").exists()
    d.start()
    try:
        d.wait_landed("long", timeout=120)
        report = json.loads((d.outbox / "long" / "report.json").read_text())
        k = report["resumed_from_step"]
        assert k >= 7 and report["steps_run"] == 60 - k and report["steps"] == 60
        log = (d.outbox / "long" / "job.log").read_text()
        assert f"stopped at step {k}" in log and f"resuming from the checkpoint at step {k}" in log
        assert f"step {k}/60 " not in log.split("resuming from the checkpoint")[1]  # step k is not run again
    finally:
        d.stop()


def test_sigterm_lets_a_short_job_finish_within_the_grace(tmp_path):
    d = Daemon(tmp_path, service={"shutdown_grace_seconds": 60})
    d.start()
    d.drop("short", {**LONG, "steps": 30})
    d.wait(lambda: step_of(d, "short") >= 2, 60, "the job to run")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0
    assert d.landed("short")
    report = json.loads((d.outbox / "short" / "report.json").read_text())
    assert report["resumed_from_step"] is None and report["steps_run"] == 30


def test_sighup_reloads_job_defaults(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        d.drop("before", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_landed("before")
        d.write_config(defaults={"steps": 3, "output": {"format": "jpg"}}, engine={"weights": "torchvision"})
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: "configuration reloaded" in d.logs(), 30, "the reload")
        assert "need a restart to take effect: engine" in d.logs()
        d.drop("after", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_landed("after")
        before = yaml.safe_load((d.outbox / "before" / "job.yaml").read_text())
        after = yaml.safe_load((d.outbox / "after" / "job.yaml").read_text())
        assert before["steps"] == 2 and after["steps"] == 3
        assert (d.outbox / "after" / "after.jpg").exists()
        assert json.loads((d.outbox / "after" / "report.json").read_text())["weights"] == "vgg19-caffe"
        d.config.write_text("defaults: {steps: -1}\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: "reload failed; keeping the running configuration" in d.logs(), 30, "the failed reload")
        assert d.alive()
    finally:
        d.stop()
