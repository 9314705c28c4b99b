"""Faults: kill -9 at random moments, files that change under the daemon, a vanishing inbox,
unreadable files, full or unwritable output folders. After each: nothing lost (nstd.audit)."""
import os
import random
import shutil
import time

import pytest

from harness import IMAGES, Daemon
from nstd.audit import snapshot


def settled(d: Daemon, names) -> bool:
    return all(d.landed(n) or d.quarantined(n) for n in names)


def test_kill_9_at_random_moments_every_job_lands_once(tmp_path):
    rng = random.Random(1234)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(IMAGES / "shipwreck.jpg", outside / "keep.jpg")
    before = snapshot(outside)
    # Kills are the test, not the crash policy (test_daemon_crash covers max_attempts).
    d = Daemon(tmp_path, service={"checkpoint_every": 3}, queue={"max_attempts": 20})
    d.start()
    names = [f"b{i}" for i in range(8)]
    d.image("hoovertowernight.jpg")
    d.image("starry_night.jpg")
    for n in names:
        d.drop(n, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "size": 48,
                   "steps": rng.choice([4, 10, 20])}, images=False)
    kills = 0
    for _ in range(5):
        time.sleep(rng.uniform(0.3, 3.0))
        if settled(d, names):
            break
        d.kill()
        kills += 1
        d.start()
    d.wait(lambda: settled(d, names), 180, "the batch")
    assert d.stop() == 0
    assert kills >= 3
    assert sorted(os.listdir(d.outbox)) == names  # each exactly once, no -2
    assert os.listdir(d.quarantine) == []
    assert d.audit(outside={outside: before}) == []


def test_style_deleted_before_the_claim_then_missing(tmp_path):
    d = Daemon(tmp_path, watch={"settle_seconds": 1.5, "missing_timeout": 4.0})
    d.start()
    try:
        d.drop("gone", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        os.unlink(d.inbox / "starry_night.jpg")  # deleted while the job settles
        d.wait_quarantined("gone", timeout=30)
        assert d.error("gone")["kind"] == "missing input"
        assert sorted(os.listdir(d.quarantine / "gone")) == ["error.yaml", "gone.yaml", "hoovertowernight.jpg", "job.log"]
    finally:
        d.stop()


def test_style_replaced_before_the_claim_uses_the_new_file(tmp_path):
    d = Daemon(tmp_path, watch={"settle_seconds": 1.5})
    d.start()
    try:
        d.drop("swap", {"content": "hoovertowernight.jpg", "style": "style.jpg"}, style=None)
        shutil.copy(IMAGES / "starry_night.jpg", d.inbox / "style.jpg")
        time.sleep(0.5)
        shutil.copy(IMAGES / "the_scream.jpg", d.inbox / "style.jpg.part")
        os.replace(d.inbox / "style.jpg.part", d.inbox / "style.jpg")  # replaced while settling
        d.wait_landed("swap")
        assert (d.outbox / "swap" / "inputs" / "style.jpg").read_bytes() == (IMAGES / "the_scream.jpg").read_bytes()
    finally:
        d.stop()


def test_inbox_removed_and_recreated(tmp_path):
    d = Daemon(tmp_path, watch={"rescan_seconds": 3600})  # events alone must find the later job
    d.start()
    try:
        shutil.rmtree(d.inbox)  # a share that drops out
        time.sleep(1.5)
        assert d.alive()
        d.inbox.mkdir()
        time.sleep(1.5)
        d.drop("back", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "steps": 1})
        d.wait_landed("back", timeout=30)
        assert "the inbox is back" in d.logs()
    finally:
        d.stop()


def test_unreadable_image_is_a_clear_error():
    """As an unprivileged user (the service's), a file it may not read gets a clear error."""
    from nstd.engine import ImageError, open_image

    base = "/tmp/nstd-perm-test"
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    shutil.copy(IMAGES / "starry_night.jpg", f"{base}/secret.jpg")
    os.chmod(f"{base}/secret.jpg", 0o000)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_image(f"{base}/secret.jpg")
                os._exit(3)
            except ImageError as exc:
                os._exit(0 if "permission denied" in str(exc) else 4)
        except BaseException:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(base, ignore_errors=True)
    if os.getuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    assert os.waitstatus_to_exitcode(status) == 0
