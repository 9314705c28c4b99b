"""Shared fixtures: real images from ../shared/images and one CPU engine per test session."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NSTD_IMAGES") or REPO.parent / "shared" / "images")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def images_dir() -> Path:
    if not (IMAGES / "tubingen.jpg").is_file():
        pytest.fail(f"test images not found at {IMAGES} (the shared/ folder must sit beside the checkout)")
    return IMAGES


@pytest.fixture(scope="session")
def engine():
    from nstd.engine import Engine

    return Engine(weights="vgg19-caffe", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def pair(images_dir):
    """(content, style) PIL images, decoded once."""
    from nstd.engine import open_image

    return open_image(images_dir / "tubingen.jpg"), open_image(images_dir / "starry_night.jpg")


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KB tmpfs: a full disk, and another filesystem than tmp_path's."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])
