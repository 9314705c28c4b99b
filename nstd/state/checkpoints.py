"""A running job's checkpoint in its state folder (`Store.checkpoint_dir`): enough to resume it.

`checkpoint.pt` holds the step and the picture (float32, lossless). The GIF frames so far are
kept in batches: each checkpoint writes the frames made since the one before as one file,
`frames/FIRST-END.pt` (raw RGB, no encoding), with one write and one fsync; older checkpoints'
`frames/NNNNN.png`, one per frame, are still read. A damaged checkpoint costs the progress,
never the job.

Checkpoints are written by a `Writer` thread, not by the worker: the worker only copies the
picture off the device and hands it over, and goes on with the next step.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch
from loguru import logger
from PIL import Image

from nstd.engine import Checkpoint
from nstd.fsutil import atomic_open


def _frames_dir(folder: Path, stride: int) -> Path:
    """`frames/` while every chance makes a frame; `frames-x4/` once the engine has thinned them
    to every 4th (thinning renumbers them all, so they start a folder of their own)."""
    return folder / ("frames" if stride == 1 else f"frames-x{stride}")


def save(folder: Path, cp: Checkpoint) -> None:
    folder.mkdir(exist_ok=True)  # never parents: a job folder that has gone (delivered) stays gone
    frames_dir = _frames_dir(folder, cp.frame_stride)
    frames_dir.mkdir(exist_ok=True)
    have = len(_layout(frames_dir))
    new = cp.frames[have:]
    if new:
        with atomic_open(frames_dir / f"{have:05d}-{have + len(new):05d}.pt") as fh:
            torch.save([torch.from_numpy(_rgb(f)) for f in new], fh)
    with atomic_open(folder / "checkpoint.pt") as fh:
        torch.save({"step": cp.step, "image": cp.image, "frames": len(cp.frames), "frame_stride": cp.frame_stride}, fh)
    for old in folder.glob("frames*"):  # an earlier stride's, now superseded
        if old != frames_dir:
            shutil.rmtree(old, ignore_errors=True)


def _rgb(img: Image.Image):
    import numpy as np

    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _layout(frames_dir: Path) -> list[tuple[str, int]]:
    """(file, index inside it) for frames 0, 1, 2... as far as they run unbroken: batches
    `FIRST-END.pt` and single `NNNNN.png` (an older nstd's) alike, read from the names only."""
    try:
        names = os.listdir(frames_dir)
    except FileNotFoundError:
        return []
    batches = {}
    for name in names:
        m = _BATCH.match(name)
        if m and int(m.group(2)) > int(m.group(1)):
            batches[int(m.group(1))] = (name, int(m.group(2)))
    pngs = {name for name in names if name.endswith(".png")}
    out: list[tuple[str, int]] = []
    while True:
        n = len(out)
        if n in batches:
            name, end = batches[n]
            out += [(name, i) for i in range(end - n)]
        elif f"{n:05d}.png" in pngs:
            out.append((f"{n:05d}.png", 0))
        else:
            return out


_BATCH = re.compile(r"^(\d{5,})-(\d{5,})\.pt$")


def load(folder: Path, log=logger) -> Checkpoint | None:
    """The checkpoint, or None when there is none or it cannot be read (logged to `log`, the job's)."""
    try:
        data = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        want, stride = int(data["frames"]), int(data.get("frame_stride", 1))
        frames_dir = _frames_dir(folder, stride)
        layout = _layout(frames_dir)[:want]
        if len(layout) < want:
            raise ValueError(f"{want} frames recorded, {len(layout)} found")
        frames: list[Image.Image] = []
        batches: dict[str, list] = {}
        for name, i in layout:
            if name.endswith(".pt"):
                if name not in batches:
                    batches[name] = torch.load(frames_dir / name, map_location="cpu", weights_only=True)
                frames.append(Image.fromarray(batches[name][i].numpy(), "RGB"))
            else:
                with Image.open(frames_dir / name) as img:
                    frames.append(img.convert("RGB"))
        return Checkpoint(int(data["step"]), data["image"].float(), frames, stride)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged checkpoint costs the progress, never the job
        log.warning("ignoring an unreadable checkpoint: {}", exc)
        return None


class Writer(threading.Thread):
    """Writes checkpoints off the worker's thread. At most one waits: a newer one replaces it
    (only the latest matters). `flush()` waits until everything handed over is on disk."""

    def __init__(self, name: str = "checkpoints"):
        super().__init__(name=name, daemon=True)
        self._pending: tuple[Path, Checkpoint, object] | None = None
        self._cond = threading.Condition()
        self._busy = False
        self.start()

    def submit(self, folder: Path, cp: Checkpoint, log=logger) -> None:
        with self._cond:
            self._pending = (folder, cp, log)
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            while self._pending is not None or self._busy:
                self._cond.wait()

    def discard(self) -> None:
        """Drop what waits (its job is over), then wait for the one being written."""
        with self._cond:
            self._pending = None
            while self._busy:
                self._cond.wait()

    def run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                folder, cp, log = self._pending
                self._pending = None
                self._busy = True
            try:
                save(folder, cp)
                log.debug("checkpoint at step {}", cp.step)
            except FileNotFoundError:
                pass  # the job left state meanwhile (delivered, cancelled)
            except Exception as exc:  # a full disk: the run goes on without this checkpoint
                log.warning("could not write the checkpoint at step {}: {}", cp.step, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


# ---------------------------------------------------------------------- kept over a limit

#: Checkpoints of jobs stopped over `limits.max_job_seconds`, kept at most this many (oldest go).
KEPT_MAX = 32


def job_key(settings: dict, digests: list[str]) -> str:
    """What a kept checkpoint belongs to: the job's inputs (their digests, in their roles' order)
    and every key that shapes the picture. The same job dropped again (`nstd retry`) finds it;
    nobody else can, for a checkpoint holds nothing that its inputs and keys do not make."""
    shaping = {k: v for k, v in settings.items() if k not in ("priority", "output")}
    text = json.dumps({"settings": shaping, "inputs": digests}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def keep(folder: Path, kept: Path, key: str) -> None:
    """Move a stopped job's checkpoint folder to `kept/<key>` (state/kept, the service's own), the
    newest in place of an older one of the same job; then the oldest past KEPT_MAX go."""
    kept.mkdir(mode=0o755, exist_ok=True)
    target = kept / key
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.rename(folder, target)
    os.utime(target)
    entries = sorted(kept.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEPT_MAX:]:
        shutil.rmtree(old, ignore_errors=True)


def adopt(kept: Path, key: str, folder: Path) -> bool:
    """A checkpoint kept for this same job becomes the job's own (moved into `folder`)."""
    try:
        os.rename(kept / key, folder)
        return True
    except OSError:  # none kept (or the job has one of its own already)
        return False
