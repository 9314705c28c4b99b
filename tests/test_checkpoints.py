"""A running job's checkpoints: batched frames (one file, one fsync per checkpoint), an older
nstd's PNG frames still read, the writer thread, and checkpoints by time."""
from __future__ import annotations

import os
import time

import torch
from PIL import Image

from nstd.state import checkpoints
from nstd.engine import Checkpoint


def frames(n: int, start: int = 0) -> list[Image.Image]:
    return [Image.new("RGB", (8, 6), (i * 20 % 256, 0, 0)) for i in range(start, start + n)]


def test_frames_are_written_in_one_batch_per_checkpoint_and_read_back(tmp_path):
    folder = tmp_path / "checkpoint"
    all_frames = frames(7)
    checkpoints.save(folder, Checkpoint(10, torch.rand(1, 3, 6, 8), all_frames[:3]))
    checkpoints.save(folder, Checkpoint(20, torch.rand(1, 3, 6, 8), all_frames[:3]))  # nothing new
    image = torch.rand(1, 3, 6, 8)
    checkpoints.save(folder, Checkpoint(30, image, all_frames))
    assert sorted(os.listdir(folder / "frames")) == ["00000-00003.pt", "00003-00007.pt"]
    cp = checkpoints.load(folder)
    assert cp.step == 30 and torch.equal(cp.image, image)
    assert [f.tobytes() for f in cp.frames] == [f.tobytes() for f in all_frames]


def test_an_older_nstds_png_frames_still_resume(tmp_path):
    folder = tmp_path / "checkpoint"
    (folder / "frames").mkdir(parents=True)
    old = frames(2)
    for i, f in enumerate(old):
        f.save(folder / "frames" / f"{i:05d}.png")
    torch.save({"step": 5, "image": torch.rand(1, 3, 6, 8), "frames": 2}, folder / "checkpoint.pt")
    more = old + frames(2, start=2)
    checkpoints.save(folder, Checkpoint(9, torch.rand(1, 3, 6, 8), more))  # adds a batch after the PNGs
    cp = checkpoints.load(folder)
    assert cp.step == 9 and [f.tobytes() for f in cp.frames] == [f.tobytes() for f in more]


def test_a_missing_frame_batch_costs_the_checkpoint_not_the_job(tmp_path):
    folder = tmp_path / "checkpoint"
    checkpoints.save(folder, Checkpoint(10, torch.rand(1, 3, 6, 8), frames(3)))
    os.unlink(folder / "frames" / "00000-00003.pt")
    assert checkpoints.load(folder) is None


def test_the_writer_keeps_only_the_latest_and_flushes(tmp_path):
    writer = checkpoints.Writer()
    folder = tmp_path / "checkpoint"
    for step in range(1, 30):
        writer.submit(folder, Checkpoint(step, torch.rand(1, 3, 6, 8), frames(step)))
    writer.flush()
    assert checkpoints.load(folder).step == 29
    writer.submit(tmp_path / "gone" / "checkpoint", Checkpoint(1, torch.rand(1, 3, 6, 8), []))
    writer.flush()  # a job folder that has gone: nothing made, nothing raised
    assert not (tmp_path / "gone").exists()


def test_checkpoints_are_due_by_time_so_a_short_job_takes_none():
    from types import SimpleNamespace

    from nstd.daemon.worker import JobProgress

    cfg = {"service": {"checkpoint_every": 0, "checkpoint_seconds": 0.2}}
    worker = SimpleNamespace(cfg=cfg)
    job = SimpleNamespace(name="j", id="i")
    progress = JobProgress(worker, job, "cpu", steps=1000)
    assert not any(progress.checkpoint_due(s) for s in range(1, 50))  # well within 0.2 s
    time.sleep(0.25)
    assert progress.checkpoint_due(50) and not progress.checkpoint_due(51)
    cfg["service"].update(checkpoint_every=10, checkpoint_seconds=0)
    steps = JobProgress(worker, job, "cpu", steps=1000)
    assert [s for s in range(1, 31) if steps.checkpoint_due(s)] == [10, 20, 30]
