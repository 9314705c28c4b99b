"""What a hostile review of retry, cancel, hooks, status and --until-empty found, kept fixed.

The quarantine may be group-writable in a shared install: its folders are treated as user files
(no link followed, FIFOs refused, sizes capped), and nothing retry writes leaves the folders."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from nstd.config import load_config
from nstd.daemon.hooks import HookRun, Hooks

REPO = Path(__file__).resolve().parent.parent


def nstd(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "nstd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def root(tmp_path):
    """A root with one hand-made quarantined job, `q`, as the daemon lays it out."""
    (tmp_path / "config.yaml").write_text(f"paths: {{root: {tmp_path / 'var'}}}\n")
    var = tmp_path / "var"
    for d in ("inbox", "outbox", "quarantine", "state/jobs", "logs"):
        (var / d).mkdir(parents=True)
    q = var / "quarantine" / "q"
    q.mkdir()
    Image.new("RGB", (40, 30)).save(q / "c.png")
    (q / "q.yaml").write_text("content: c.png\nstyle: c.png\nsteps: 2\n")
    (q / "error.yaml").write_text(yaml.safe_dump({"job": "q", "kind": "invalid job file",
                                                   "files": {"c.png": "c.png", "q.yaml": "q.yaml"}}))
    (q / "job.log").write_text("")
    return tmp_path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_the_job_name_in_error_yaml_is_not_a_path(root):
    outside = root / "outside"
    outside.mkdir()
    error = yaml.safe_load((root / "var/quarantine/q/error.yaml").read_text())
    (root / "var/quarantine/q/error.yaml").write_text(yaml.safe_dump({**error, "job": str(outside / "evil")}))
    r = nstd("retry", "q", "steps=2", "--config", root / "config.yaml")
    assert r.returncode == 0, r.stderr
    assert os.listdir(outside) == []
    assert sorted(os.listdir(root / "var/inbox")) == ["c.png", "q.yaml"]


@pytest.mark.parametrize("kind", ["fifo", "link", "huge", "bomb"])
def test_a_hostile_error_yaml_is_one_line_and_moves_nothing(root, kind):
    error = root / "var/quarantine/q/error.yaml"
    error.unlink()
    if kind == "fifo":
        os.mkfifo(error)
    elif kind == "link":
        error.symlink_to("/etc/hostname")
    elif kind == "huge":
        error.write_text("files: {}\n" + "#" * (2 << 20))
    else:
        error.write_text("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n")
    before = tree(root / "var")
    r = nstd("retry", "q", "--config", root / "config.yaml", timeout=20)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert tree(root / "var") == before


@pytest.mark.parametrize("override, why", [
    ("content=/etc/passwd", "absolute path"), ("style=../x.png", "'..'"), ("init=/etc/passwd", "absolute path"),
    ("content=[1]", "expected a file name"), ("style=[]", "expected a file name or a list"),
])
def test_overrides_naming_files_are_checked_before_anything_moves(root, override, why):
    before = tree(root / "var")
    r = nstd("retry", "q", override, "--config", root / "config.yaml")
    assert r.returncode == 2 and why in r.stderr and "would be refused" in r.stderr, r.stderr
    assert tree(root / "var") == before


def test_hostile_origins_stay_at_the_top_of_the_inbox_and_never_hidden(root):
    """error.yaml's `files:` edited to name places outside, or hidden names: every input still
    lands at the top of the inbox under a name the daemon will take, and the job names it."""
    q = root / "var/quarantine/q"
    (q / "x.png").write_bytes((q / "c.png").read_bytes())
    (q / "q.yaml").write_text("content: .hidden.png\nstyle: ../../etc/x.png\n")
    error = yaml.safe_load((q / "error.yaml").read_text())
    error["files"] = {"c.png": ".hidden.png", "x.png": "../../etc/x.png", "q.yaml": "q.yaml"}
    (q / "error.yaml").write_text(yaml.safe_dump(error))
    r = nstd("retry", "q", "--config", root / "config.yaml")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(root / "var/inbox")) == ["c.png", "q.yaml", "x.png"]
    job = yaml.safe_load((root / "var/inbox/q.yaml").read_text())
    assert (job["content"], job["style"]) == ("c.png", "x.png")


def test_two_retries_at_once_put_the_job_back_once(root):
    results = []

    def one():
        results.append(nstd("retry", "q", "--config", root / "config.yaml"))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.returncode for r in results)[0] == 0
    assert [r.returncode for r in results].count(0) == 1, [r.stderr for r in results]
    assert all(len(r.stderr.splitlines()) <= 1 for r in results)
    assert sorted(os.listdir(root / "var/inbox")) == ["c.png", "q.yaml"]


def test_no_inbox_folder_is_one_line(root):
    os.rename(root / "var/inbox", root / "var/gone")
    r = nstd("retry", "q", "--config", root / "config.yaml")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "inbox" in r.stderr
    assert sorted(os.listdir(root / "var/quarantine/q")) == ["c.png", "error.yaml", "job.log", "q.yaml"]


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', '{"pid": "abc", "waiting": "x", "running": "y"}',
                                  '{"pid": 0, "state": "running"}', '{"pid": -1}', '{"updated_at": "now", "pid": 1e400}',
                                  '{"running": {}, "waiting": [{}], "queue": [1]}', "not json"])
def test_a_damaged_status_file_is_never_a_traceback(root, text):
    (root / "var/state/status.json").write_text(text)
    r = nstd("status", "--config", root / "config.yaml")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no daemon is running" in r.stdout, r.stdout + r.stderr


def test_status_piped_into_head_says_nothing_more(root):
    r = subprocess.run(f"{sys.executable} -m nstd.cli status --config {root / 'config.yaml'} | head -c 1",
                       shell=True, capture_output=True, text=True)
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr


def test_a_hook_that_leaves_a_child_holding_its_output_does_not_stop_later_hooks(tmp_path):
    hooks = Hooks({"hooks": {"on_done": None, "on_failed": None, "timeout_seconds": 5}})
    mark = tmp_path / "ran"
    t0 = time.monotonic()
    hooks.run_one(HookRun("done", "sh -c 'setsid sleep 60 & echo started'", {}, "j"))
    hooks.run_one(HookRun("done", f"touch {mark}", {}, "j"))
    assert mark.exists() and time.monotonic() - t0 < 4


def test_a_hooks_output_is_kept_short(tmp_path):
    hooks = Hooks({"hooks": {"on_done": None, "on_failed": None, "timeout_seconds": 30}})
    lines = []
    from loguru import logger

    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        hooks.run_one(HookRun("done", "sh -c 'head -c 50000000 /dev/zero; echo; echo the end'", {}, "j"))
    finally:
        logger.remove(sink)
    [line] = [x for x in lines if "hooks.on_done" in x]
    assert len(line) < 2500 and "the end" in line and "\0" not in line


def test_a_hook_command_that_cannot_be_split_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("hooks: {on_done: \"'unterminated\"}\n")
    with pytest.raises(ValueError, match="hooks.on_done: cannot be split"):
        load_config(tmp_path / "c.yaml")


def test_a_bad_key_is_taken_out_with_key_equals_nothing_and_missing_inputs_are_named(root):
    q = root / "var/quarantine/q"
    (q / "q.yaml").write_text("content: c.png\nstyle: elsewhere.png\nstpes: 3\n")
    r = nstd("retry", "q", "--config", root / "config.yaml")
    assert r.returncode == 2 and "take one out with key=" in r.stderr
    r = nstd("retry", "q", "stpes=", "steps=3", "--config", root / "config.yaml")
    assert r.returncode == 0, r.stderr
    assert "note: the job waits for elsewhere.png" in r.stdout
    job = yaml.safe_load((root / "var/inbox/q.yaml").read_text())
    assert "stpes" not in job and job["steps"] == 3
    kept = next((root / "var/quarantine").glob("q.retried-*"))
    assert yaml.safe_load((kept / "retried.yaml").read_text())["overrides"] == {"stpes": "(removed)", "steps": 3}


def test_cancel_of_a_finished_job_says_where_it_went(root):
    (root / "var/outbox/done").mkdir()
    r = nstd("cancel", "done", "--config", root / "config.yaml")
    assert r.returncode == 4 and "it has finished" in r.stderr and "outbox/done" in r.stderr


def test_names_reach_the_operators_terminal_escaped(root):
    """A job or folder name holding escape sequences (clear the screen, set the title) is printed
    by status, cancel and retry, and by their errors, with its control characters escaped."""
    evil = "x\x1b[2J\x1b]0;owned\x07"
    q = root / "var" / "quarantine"
    (q / "q").rename(q / evil)
    (root / "var" / "inbox" / f"{evil}.yaml").write_text("content: a.png\nstyle: b.png\n")
    cfg = ["--config", root / "config.yaml"]
    for args in (("status",), ("cancel", evil), ("retry", evil), ("retry", "no" + evil), ("cancel", "no" + evil)):
        r = nstd(*args, *cfg)
        out = r.stdout + r.stderr
        assert "\x1b" not in out and "\x07" not in out, (args, out)
    r = nstd("cancel", "no" + evil, *cfg)
    assert "\\x1b[2J" in r.stderr, r.stderr


@pytest.mark.parametrize("plant", ["fifo", "zero-link"])
def test_cancel_reads_a_planted_error_yaml_as_an_input(root, plant):
    """A quarantine folder named like the job, holding a FIFO or a link to /dev/zero as its
    error.yaml, is skipped at once: cancel neither hangs nor reads until memory runs out."""
    from nstd.commands.cancel import quarantined_as
    from nstd.state.claim import Claimed

    trap = root / "var" / "quarantine" / "long"
    trap.mkdir()
    if plant == "fifo":
        os.mkfifo(trap / "error.yaml")
    else:
        os.symlink("/dev/zero", trap / "error.yaml")
    done = []
    t = threading.Thread(target=lambda: done.append(quarantined_as(root / "var" / "quarantine",
                                                                  Claimed("abc", "long", root))), daemon=True)
    t.start()
    t.join(10)
    assert done == [None]


def test_retry_of_a_long_named_folder_does_all_of_it(root):
    """A quarantine folder whose name leaves no room for `.retried-<time>`: the job goes back and
    the folder is marked, both, or neither (it used to do the first and fail on the second)."""
    long = "n" * 250
    q = root / "var" / "quarantine"
    (q / "q").rename(q / long)
    r = nstd("retry", long, "--config", root / "config.yaml")
    assert r.returncode == 0, r.stderr
    marked = [d for d in os.listdir(q) if ".retried-" in d]
    assert len(marked) == 1 and len(marked[0].encode()) <= 255 and not (q / long).exists()
    assert (q / marked[0] / "retried.yaml").is_file()
    inbox = os.listdir(root / "var" / "inbox")
    assert "c.png" in inbox and any(n.endswith(".yaml") for n in inbox), inbox


def test_retry_that_fails_midway_leaves_the_folder_as_it_was(root, monkeypatch):
    from nstd.commands import retry as retry_mod
    from nstd.state import safefs

    before = tree(root / "var")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safefs, "write_new", broken)  # the new job file cannot be written
    with pytest.raises(OSError):
        retry_mod.retry(load_config(root / "config.yaml"), "q", {})
    assert tree(root / "var") == before


def test_a_name_can_neither_forge_a_line_nor_reach_the_terminal_raw(root):
    """A newline in a name (a forged 'nstd is running' line), the 8-bit CSI byte 0x9b and 0xff
    from a name that is not UTF-8, and U+202E (turns the rest of the line around): status,
    cancel and retry print each as an escape, the line stays one line."""
    import json
    import time

    forged = "nl\nnstd is running (pid 1, FORGED)"
    raw = os.fsdecode(b"bad\x9b31mRED\xff")
    bidi = "rtl\u202eevil"
    var = root / "var"
    now = time.time()
    (var / "state" / "status.json").write_text(json.dumps({
        "pid": 1, "state": "running", "started_at": now, "updated_at": now, "queue": [forged, raw, bidi],
        "waiting": [{"job": forged + ".yaml", "reason": "waiting for x"}], "done": 0, "failed": 0}))
    from nstd.state.lock import RootLock

    lock = RootLock(var / "state")  # a daemon holds the root
    try:
        out = nstd("status", "--config", root / "config.yaml").stdout
    finally:
        lock.release()
    assert "FORGED" in out and not any(line.startswith("nstd is running (pid 1, FORGED") for line in out.splitlines())
    assert "\\x9b31mRED\\xff" in out and "\\u202e" in out and "\u202e" not in out, out
    (var / "inbox" / f"{forged}.yaml").write_text("content: a.png\nstyle: b.png\n")
    r = nstd("cancel", forged, "--config", root / "config.yaml")
    assert "FORGED" in r.stdout and len(r.stdout.strip().splitlines()) == 1, r.stdout
    q = var / "quarantine" / "plant"
    q.mkdir()
    (q / "plant.yaml").write_text('content: "c\\nnstd: FORGED LINE\\e[2J.jpg"\nstyle: s.jpg\n')
    (q / "error.yaml").write_text(yaml.safe_dump({"job": "plant", "kind": "invalid job file",
                                                  "files": {"plant.yaml": "plant.yaml"}}))
    r = nstd("retry", "plant", "--config", root / "config.yaml")
    lines = (r.stdout + r.stderr).splitlines()
    assert not any(line.startswith("nstd: FORGED") for line in lines) and "\x1b" not in r.stdout + r.stderr, lines
