"""End to end: the real daemon as a subprocess, real images at 32 px, a few steps."""
import json
import os
import threading
import time

import pytest
import yaml
from PIL import Image

from harness import IMAGES, Daemon


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


def test_a_job_lands_complete(daemon):
    daemon.start()
    daemon.drop("tower", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 3})
    daemon.wait_landed("tower")
    out = daemon.outbox / "tower"
    assert sorted(os.listdir(out)) == ["inputs", "job.log", "job.yaml", "report.json", "tower.gif", "tower.png"]
    assert sorted(os.listdir(out / "inputs")) == ["hoovertowernight.jpg", "starry_night.jpg", "tower.yaml"]
    assert (out / "inputs" / "starry_night.jpg").read_bytes() == (IMAGES / "starry_night.jpg").read_bytes()
    assert Image.open(out / "tower.png").size == (32, 17)
    with Image.open(out / "tower.gif") as gif:
        assert gif.n_frames == 4  # start + one frame per step
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["steps"] == 3 and job["style_weight"] == 1e4 and job["content"] == "hoovertowernight.jpg"
    assert set(job) >= {"size", "optimizer", "init", "pooling", "content_layers", "style_layers", "seed", "gif", "output"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings"]) == {"waited", "loaded", "targets", "optimised", "encoded"}
    assert report["steps"] == report["steps_total"] == 3 and report["size_used"] == [32, 17] and report["device"] == "cpu"
    assert report["weights"] == "vgg19-caffe" and "torch" in report["versions"]
    assert report["e512"] == pytest.approx((3 + 1 / 3) * 32 * 17 / 512**2, abs=0.01)  # 3 steps + the check
    log = (out / "job.log").read_text()
    assert "claimed as" in log and "step 3/3" in log and "done:" in log
    daemon.wait_state_clean()
    assert os.listdir(daemon.inbox) == []
    daemon.wait(lambda: daemon.status()["done"] == 1, 10, "the done count")  # counted after the rename
    assert "| tower |" in (daemon.root / "logs" / "nstd.log").read_text()


def test_a_coarse_to_fine_job_reports_its_stages(daemon):
    daemon.start()
    daemon.drop("grow", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg",
                         "stages": [{"size": 32, "steps": 2}, {"size": 48, "steps": 2}], "gif": {"every": 1}})
    daemon.wait_landed("grow")
    out = daemon.outbox / "grow"
    assert Image.open(out / "grow.png").size == (48, 25)
    with Image.open(out / "grow.gif") as gif:
        sizes = set()
        for i in range(gif.n_frames):
            gif.seek(i)
            sizes.add(gif.size)
        assert gif.n_frames == 5 and sizes == {(48, 25)}  # every stage's frames at one size
    job = yaml.safe_load((out / "job.yaml").read_text())
    assert job["size"] == 48 and job["stages"] == [{"size": 32, "steps": 2}, {"size": 48, "steps": 2}]
    report = json.loads((out / "report.json").read_text())
    # steps: the job key (the first stage's, as job.yaml says); steps_total: every stage's
    assert report["steps"] == 2 and report["steps_total"] == 4 and report["size_used"] == [48, 25]
    assert [(s["size"], s["steps"], s["techniques"]) for s in report["stages"]] == [([32, 17], 2, []), ([48, 25], 2, [])]
    # the CPU's budget (half the machine) holds such a job plainly, and the record says so
    assert all(s["seconds"] > 0 and s["why"].startswith("the plain pass fits") for s in report["stages"])
    assert report["memory_budget_bytes"] > 0
    assert "step 4/4" in (out / "job.log").read_text()


def test_progress_is_logged_at_every_twentieth_of_the_steps_the_job_runs(daemon):
    """guarantees.md: step lines at every 5 % of the steps and the last; a job in stages counts
    all of its stages' steps, as the engine runs them."""
    daemon.start()
    daemon.drop("forty", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 40, "size": 32})
    daemon.drop("staged", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg",
                           "stages": [{"size": 32, "steps": 30}, {"size": 48, "steps": 10}]})
    daemon.wait_landed("forty", "staged")
    for name in ("forty", "staged"):
        steps = [line for line in (daemon.outbox / name / "job.log").read_text().splitlines() if " | step " in line]
        assert len(steps) == 20 and "step 40/40" in steps[-1], (name, steps)


def test_ten_jobs_share_one_style(daemon):
    daemon.start()
    daemon.image("starry_night.jpg")
    for i in range(10):
        daemon.image("hoovertowernight.jpg", f"c{i}.jpg")
    for i in range(10):
        daemon.drop(f"j{i}", {"content": f"c{i}.jpg", "style": "starry_night.jpg", "steps": 1}, images=False)
    violations = []

    def watch():
        style = daemon.inbox / "starry_night.jpg"
        while not all(daemon.landed(f"j{i}") for i in range(10)):
            present = style.exists()  # look at the style first: sidecars only ever leave
            waiting = [n for n in os.listdir(daemon.inbox) if n.endswith(".yaml")]
            if waiting and not present:
                # The last job's own claim moves the style a moment before its sidecar (the commit
                # marker, moved last); a sidecar still there after that moment was left stranded.
                time.sleep(0.5)
                stranded = [n for n in waiting if (daemon.inbox / n).exists()]
                if stranded:
                    violations.append(stranded)
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    daemon.wait_landed(*(f"j{i}" for i in range(10)))
    t.join()
    assert violations == []
    assert not (daemon.inbox / "starry_night.jpg").exists()
    for i in range(10):
        assert (daemon.outbox / f"j{i}" / "inputs" / "starry_night.jpg").stat().st_size > 0
    caches = [json.loads((daemon.outbox / f"j{i}" / "report.json").read_text())["style_cache"] for i in range(10)]
    assert max(c["misses"] for c in caches) == 1  # style targets computed once for the batch


def test_named_by_convention_and_same_name_twice(daemon):
    daemon.start()
    daemon.image("hoovertowernight.jpg", "x.content.jpg")
    daemon.image("the_scream.jpg", "x.style.jpg")
    daemon.drop("x", "", images=False)
    daemon.wait_landed("x")
    daemon.image("hoovertowernight.jpg", "x.content.jpg")
    daemon.image("the_scream.jpg", "x.style.jpg")
    daemon.drop("x", "steps: 1\n", images=False)
    daemon.wait_landed("x-2")
    assert sorted(os.listdir(daemon.outbox / "x-2" / "inputs")) == ["x.content.jpg", "x.style.jpg", "x.yaml"]


def test_slow_writer_is_not_taken_before_it_settles(tmp_path):
    d = Daemon(tmp_path, watch={"settle_seconds": 1.0})
    d.start()
    try:
        data = (IMAGES / "starry_night.jpg").read_bytes()
        d.image("hoovertowernight.jpg")
        d.drop("slow", {"content": "hoovertowernight.jpg", "style": "starry.jpg"}, images=False)
        with open(d.inbox / "starry.jpg", "wb") as fh:
            for i in range(0, len(data), len(data) // 8):
                fh.write(data[i : i + len(data) // 8])
                fh.flush()
                time.sleep(0.4)
                assert (d.inbox / "slow.yaml").exists(), "taken while still being written"
        d.wait_landed("slow")
        assert (d.outbox / "slow" / "inputs" / "starry.jpg").read_bytes() == data
    finally:
        d.stop()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_file_renamed_into_the_inbox_is_taken_by_events(tmp_path, polling):
    # The periodic rescan is an hour away: only the observer's events can find this job.
    d = Daemon(tmp_path, watch={"polling": polling, "rescan_seconds": 3600})
    d.start()
    try:
        staging = tmp_path / "staging"
        d.image("hoovertowernight.jpg", folder=staging)
        d.image("the_scream.jpg", folder=staging)
        (staging / "moved.yaml").write_text("content: hoovertowernight.jpg\nstyle: the_scream.jpg\nsteps: 1\n")
        for n in ("hoovertowernight.jpg", "the_scream.jpg", "moved.yaml"):
            os.rename(staging / n, d.inbox / n)
        d.wait_landed("moved", timeout=30)
    finally:
        d.stop()


def test_jobs_dropped_while_down_are_taken_at_start(daemon):
    daemon.root.mkdir()
    (daemon.root / "inbox").mkdir()
    daemon.drop("early", {"steps": 1, "content": "hoovertowernight.jpg", "style": "shipwreck.jpg"},
                style="shipwreck.jpg")
    daemon.start()
    daemon.wait_landed("early")


def test_priority_then_age(daemon):
    daemon.start()
    # One long job keeps the worker busy while the others queue up behind it.
    daemon.drop("first", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 80, "size": 64})
    daemon.wait(lambda: (daemon.status() or {}).get("running"), 60, "the first job to run")
    daemon.drop("low", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1})
    daemon.drop("low-later", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1})
    daemon.drop("high", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1, "priority": 5})
    daemon.wait(lambda: len((daemon.status() or {}).get("queue", [])) == 3, 60, "three queued jobs")
    assert (daemon.status() or {})["running"]["name"] == "first"  # still busy: the order is the queue's
    assert daemon.status()["queue"][0] == "high"
    daemon.wait_landed("first", "low", "low-later", "high")
    starts = {n: (daemon.outbox / n / "job.log").read_text().split(" | INFO    | started")[0].rsplit("\n", 1)[-1]
              for n in ("high", "low", "low-later")}
    assert starts["high"] < starts["low"] < starts["low-later"], starts


def test_status_command_while_running(tmp_path):
    import subprocess
    import sys

    daemon = Daemon(tmp_path, service={"shutdown_grace_seconds": 0})
    daemon.start()
    daemon.drop("busy", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 120, "size": 64})
    daemon.wait(lambda: ((daemon.status() or {}).get("running") or {}).get("step", 0) >= 2, 60, "a running job")
    r = subprocess.run([sys.executable, "-m", "nstd.cli", "status", "--config", str(daemon.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nstd is running" in r.stdout and "running: busy step" in r.stdout and "ETA" in r.stdout
    assert daemon.stop() == 0


def test_a_job_without_room_on_disk_waits_with_its_reason_and_runs_once_there_is(tmp_path):
    """limits.min_free_mb larger than the disk: the job is held (not failed, no attempt counted),
    `nstd status` says why; once room is made (here: the threshold lowered, SIGHUP) it runs."""
    import signal
    import subprocess
    import sys

    d = Daemon(tmp_path, limits={"min_free_mb": 2**40 // 2**20})
    d.start()
    try:
        d.drop("big", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 2})
        d.wait(lambda: "big" in ((d.status() or {}).get("held") or {}), 30, "the job to be held")
        out = subprocess.run([sys.executable, "-m", "nstd.cli", "status", "--config", str(d.config)],
                             capture_output=True, text=True, timeout=60).stdout
        assert "held: big: waiting for disk space:" in out and "limits.min_free_mb=" in out, out
        assert "waiting for disk space" in d.logs() and d.logs().count("waiting for disk space") == 1
        d.write_config(limits={"min_free_mb": "auto"})
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_landed("big", timeout=90)
        assert json.loads((d.outbox / "big" / "report.json").read_text())["attempts"] == 1
        d.wait(lambda: not (d.status() or {}).get("held"), 10, "the hold to be cleared")
    finally:
        d.stop()


def test_the_room_a_job_needs_grows_with_its_size_and_gif():
    from nstd.config import load_config
    from nstd.daemon import diskroom
    from nstd.job.spec import Job

    settings = load_config(None)["defaults"]
    small = diskroom.estimate(Job.of({**settings, "size": 512}))
    big = diskroom.estimate(Job.of({**settings, "size": 4096}))
    assert big["state"] > 8 * small["state"] and big["outbox"] > 4 * small["outbox"]
    assert small["state"] >= 2 * 512 * 512 * 12  # two float checkpoints
    assert diskroom.estimate(Job.of({**settings, "size": 512, "gif": False}))["outbox"] == 512 * 512 * 3


def test_outbox_keep_days_removes_old_results_only_and_says_so(tmp_path):
    """Results whose report.json is older than keep_days go, at the start and hourly; a fresh
    result, a folder that is not nstd's delivery, a link and a hidden transfer stay. The log,
    `nstd status` and the page name what went."""
    import subprocess
    import sys
    import urllib.request

    d = Daemon(tmp_path, outbox={"keep_days": 7}, web={"enabled": True, "listen": "127.0.0.1:0"})
    d.outbox.mkdir(parents=True, exist_ok=True)
    old = time.time() - 8 * 86400
    for name in ("old1", "old2", "fresh"):
        (d.outbox / name / "inputs").mkdir(parents=True)
        (d.outbox / name / "inputs" / "mine.jpg").write_bytes(b"x")
        (d.outbox / name / "report.json").write_text("{}")
        if name != "fresh":
            os.utime(d.outbox / name / "report.json", (old, old))
    (d.outbox / "notours").mkdir()  # an old folder without nstd's report
    os.utime(d.outbox / "notours", (old, old))
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "report.json").write_text("{}")
    os.utime(outside / "x" / "report.json", (old, old))
    os.symlink(outside / "x", d.outbox / "link")  # a link to an old result elsewhere
    d.start()
    try:
        d.wait(lambda: ((d.status() or {}).get("expired") or {}).get("count") == 2, 30, "the old results removed")
        assert sorted(os.listdir(d.outbox)) == ["fresh", "link", "notours"]
        assert (outside / "x" / "report.json").exists()
        assert "removed 2 result(s) older than 7 days from the outbox (outbox.keep_days): old1, old2" in d.logs()
        out = subprocess.run([sys.executable, "-m", "nstd.cli", "status", "--config", str(d.config)],
                             capture_output=True, text=True, timeout=60).stdout
        assert "outbox: 2 result(s) older than 7 days removed since the start (outbox.keep_days)" in out, out
        assert "old1, old2" in out
        d.wait(lambda: (d.status() or {}).get("web"), 30, "the page")
        with urllib.request.urlopen(d.status()["web"], timeout=10) as r:
            assert "2 result(s) older than 7 days removed from the outbox" in r.read().decode()
    finally:
        d.stop()


def test_prints_as_16_bit_tiff_and_jpeg_quality(tmp_path):
    """output: {format: tiff, bits: 16} keeps the optimised picture without the 8-bit rounding;
    output.quality sets jpg's; 16 bits other than tiff, or quality for png, are refused by name."""
    import subprocess
    import sys

    import numpy as np
    import tifffile

    d = Daemon(tmp_path)
    d.start()
    try:
        base = {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 3, "gif": False}
        d.drop("print", {**base, "output": {"format": "tiff", "bits": 16}})
        d.drop("small", {**base, "output": {"format": "jpg", "quality": 30}})
        d.drop("fine", {**base, "output": {"format": "jpg"}})
        d.wait_landed("print", "small", "fine")
        deep = tifffile.imread(d.outbox / "print" / "print.tiff")
        assert deep.dtype == np.uint16 and deep.shape == (17, 32, 3)
        assert np.any(deep % 257 != 0)  # values between the 8-bit levels: not an 8-bit picture widened
        flat = np.asarray(Image.open(d.outbox / "fine" / "fine.jpg"), dtype=np.float64)
        assert np.abs(deep / 257.0 - flat).mean() < 8  # the same picture
        assert (d.outbox / "small" / "small.jpg").stat().st_size < (d.outbox / "fine" / "fine.jpg").stat().st_size
        (d.inbox / "x.yaml").write_text("content: a.jpg\nstyle: a.jpg\noutput: {format: png, bits: 16, quality: 80}\n")
        r = subprocess.run([sys.executable, "-m", "nstd.cli", "validate", str(d.inbox / "x.yaml"), "--config", str(d.config)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "output.bits: 16 bits per channel are written as tiff only" in r.stdout, r.stdout
    finally:
        d.stop()
