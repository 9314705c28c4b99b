"""A running job's checkpoint in its state folder (`Store.checkpoint_dir`): enough to resume it.

`checkpoint.pt` holds the step and the picture (float32, lossless); `frames/NNNNN.png` the GIF
frames so far, each written once. A damaged checkpoint costs the progress, never the job.
"""
from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger
from PIL import Image

from nstd.engine import Checkpoint, images
from nstd.fsutil import atomic_open


def save(folder: Path, cp: Checkpoint) -> None:
    frames_dir = folder / "frames"
    folder.mkdir(exist_ok=True)  # never parents: a job folder that has gone (delivered) stays gone
    frames_dir.mkdir(exist_ok=True)
    for i, frame in enumerate(cp.frames):
        path = frames_dir / f"{i:05d}.png"
        if not path.exists():
            images.save(frame, path, "png")
    with atomic_open(folder / "checkpoint.pt") as fh:
        torch.save({"step": cp.step, "image": cp.image, "frames": len(cp.frames)}, fh)


def load(folder: Path, log=logger) -> Checkpoint | None:
    """The checkpoint, or None when there is none or it cannot be read (logged to `log`, the job's)."""
    try:
        data = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        frames = []
        for i in range(int(data["frames"])):
            with Image.open(folder / "frames" / f"{i:05d}.png") as img:
                frames.append(img.convert("RGB"))
        return Checkpoint(int(data["step"]), data["image"].float(), frames)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged checkpoint costs the progress, never the job
        log.warning("ignoring an unreadable checkpoint: {}", exc)
        return None
