import os
import stat

import pytest

from nstd.fsutil import atomic_open, atomic_write_bytes


def test_atomic_write_replaces_whole_file_with_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a" / "r.bin", b"one")
        atomic_write_bytes(tmp_path / "a" / "r.bin", b"two")
    finally:
        os.umask(old)
    path = tmp_path / "a" / "r.bin"
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "a") == ["r.bin"]


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as fh:
            fh.write(b"half")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["r.bin"]
