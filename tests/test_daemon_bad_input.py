"""Every kind of bad input is quarantined with a reason, and the daemon runs on."""
import io
import os

import pytest
from PIL import Image

from harness import IMAGES, Daemon

GOOD = "content: hoovertowernight.jpg\nstyle: starry_night.jpg\n"
BOMB = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
)

#: name -> (sidecar text, files to write into the inbox {name: bytes}, expected kind, words in the message)
CASES = {
    "broken-yaml": ("content: [unclosed\n", {}, "invalid job file", "not valid YAML"),
    "unknown-key": (GOOD + "colour: red\n", {}, "invalid job file", "colour: unknown key"),
    "wrong-type": (GOOD + "steps: lots\n", {}, "invalid job file", "steps: expected an integer"),
    "out-of-range": (GOOD + "size: 100000\n", {}, "invalid job file", "size: expected an integer from 32 to 8192"),
    "bad-choice": (GOOD + "optimizer: sgd\n", {}, "invalid job file", "optimizer: expected one of lbfgs, adam"),
    "top-level-list": ("- a\n- b\n", {}, "invalid job file", "expected a mapping"),
    "dotdot": ("content: ../outside/fifo.jpg\nstyle: starry_night.jpg\n", {}, "path outside inbox", "'..' is not allowed"),
    "absolute": ("content: OUTSIDE\nstyle: starry_night.jpg\n", {}, "path outside inbox", "absolute path"),
    "symlink-out": ("content: sneaky.jpg\nstyle: starry_night.jpg\n", {}, "path outside inbox", "link that leads out"),
    "corrupt": ("content: corrupt.jpg\nstyle: starry_night.jpg\n", {"corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(3000)},
                "bad image", "corrupt.jpg"),
    "zero-byte": ("content: empty.png\nstyle: starry_night.jpg\n", {"empty.png": b""}, "bad image", "empty (0 bytes)"),
    "non-image": ("content: notes.jpg\nstyle: starry_night.jpg\n", {"notes.jpg": b"dear diary\n" * 50}, "bad image",
                  "not an image"),
    "oversized": ("content: the_scream.jpg\nstyle: starry_night.jpg\n", {}, "bad image", "over the limit"),
    "truncated": ("content: half.jpg\nstyle: starry_night.jpg\n", {"half.jpg": None}, "bad image", "truncated"),
    "missing": ("content: never-comes.jpg\nstyle: starry_night.jpg\n", {}, "missing input", "never-comes.jpg"),
    "alias-bomb": (BOMB, {}, "invalid job file", "anchors and aliases"),
    "python-tag": ("content: !!python/object/apply:os.system ['touch PWNED']\nstyle: s.jpg\n", {}, "invalid job file",
                   "not valid YAML"),
}


def test_bad_input_is_quarantined_and_the_daemon_runs_on(tmp_path):
    d = Daemon(tmp_path, watch={"missing_timeout": 4.0}, limits={"max_pixels": 1_500_000})
    d.inbox.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo.jpg")  # opening this would block the daemon: it must never be read
    os.symlink(outside / "fifo.jpg", d.inbox / "sneaky.jpg")
    os.mkfifo(outside / "job.yaml")
    os.symlink(outside / "job.yaml", d.inbox / "linked-sidecar.yaml")  # the job file itself leads out
    d.image("hoovertowernight.jpg")
    d.image("starry_night.jpg")
    d.image("the_scream.jpg")  # 1200x1528 = 1.8 M pixels, over the 1.5 M limit
    half = (IMAGES / "tubingen.jpg").read_bytes()
    d.start()
    for name, (text, files, _, _) in CASES.items():
        for fname, data in files.items():
            (d.inbox / fname).write_bytes(half[: len(half) // 2] if data is None else data)
        d.drop(name, text.replace("OUTSIDE", str(outside / "fifo.jpg")), images=False)
    d.drop("good-after", GOOD + "steps: 1\n", images=False)
    d.wait_quarantined(*CASES, "linked-sidecar", timeout=120)
    assert d.error("linked-sidecar")["kind"] == "path outside inbox"
    assert (d.quarantine / "linked-sidecar" / "linked-sidecar.yaml").is_symlink()  # the link, moved as dropped
    d.wait_landed("good-after", timeout=60)
    assert d.alive()
    for name, (_, files, kind, words) in CASES.items():
        err = d.error(name)
        assert err["kind"] == kind, (name, err)
        assert words in err["message"], (name, err)
        assert err["stage"] == "intake" and err["job"] == name
        folder = d.quarantine / name
        assert f"{name}.yaml" in os.listdir(folder), name  # the sidecar as dropped
        assert "job.log" in os.listdir(folder)
        for fname in files:
            assert fname in os.listdir(folder), (name, fname)
    assert (outside / "fifo.jpg").exists() and not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    assert (d.inbox / "sneaky.jpg").is_symlink()  # a link the daemon refused stays where the user put it
    assert d.status()["failed"] == len(CASES) + 1 and d.status()["done"] == 1
    assert d.stop() == 0


def test_nested_folders_refuse_to_start(tmp_path):
    d = Daemon(tmp_path, paths={"outbox": str(tmp_path / "var" / "inbox" / "out")})
    d.start(wait=False)
    d.proc.wait(60)
    assert d.proc.returncode == 2
    assert "lies inside the inbox" in d.logs()
