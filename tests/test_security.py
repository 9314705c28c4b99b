"""A hostile inbox user: links, folders, FIFOs and files swapped while jobs are judged and claimed,
fuzzed job files, the cases of the security issue, two daemons, and a daemon without file
permission capabilities. nstd.audit.audit_confinement is the judge: nothing outside the inbox is
ever read, moved or changed, and no link or special file ever reaches state/, outbox/ or quarantine/."""
from __future__ import annotations

import io
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time

from pathlib import Path

import pytest
from PIL import Image

from harness import Daemon
from nstd.audit import audit_confinement, snapshot

GOOD = "content: hoovertowernight.jpg\nstyle: starry_night.jpg\n"


def png(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed % 256, (seed * 7) % 256, 99)).save(buf, "PNG")
    return buf.getvalue()


def make_outside(tmp_path):
    """Files a hostile user would like nstd to read, move or overwrite: a private folder too."""
    outside = tmp_path / "outside"
    (outside / "private").mkdir(parents=True)
    (outside / "secret.png").write_bytes(png(1, 9))
    (outside / "private" / "p.png").write_bytes(png(2, 9))
    (outside / "job.yaml").write_text("content: ../outside/secret.png\nstyle: secret.png\n# outside\n")
    os.mkfifo(outside / "fifo.png")
    (outside / "private").chmod(0o700)
    return outside


# --------------------------------------------------------------------------- the property


def _replace(path, kind, outside, rng):
    """Atomically (where the kernel allows) make `path` a link out, a link in, a file, a FIFO or a folder."""
    tmp = path.with_name(f".swap-{rng.random()}")
    try:
        if kind == "link-out":
            os.symlink(rng.choice([outside / "secret.png", outside / "private", outside / "fifo.png",
                                   outside / "job.yaml", outside]), tmp)
        elif kind == "link-in":
            os.symlink(rng.choice(["c-other.png", "sub", "."]), tmp)
        elif kind == "file":
            tmp.write_bytes(png(rng.randrange(1000)))
        elif kind == "fifo":
            os.mkfifo(tmp)
        elif kind == "dir":
            tmp.mkdir()
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    except OSError:
        for cleanup in (os.unlink, os.rmdir):
            try:
                cleanup(tmp)
            except OSError:
                pass


class Swapper(threading.Thread):
    """Keeps swapping the names a job uses until stopped."""

    def __init__(self, inbox, names, outside, seed):
        super().__init__(daemon=True)
        self.inbox, self.names, self.outside, self.rng = inbox, names, outside, random.Random(seed)
        self.halt = threading.Event()

    def run(self):
        self.halt.wait(self.rng.random() * 0.02)  # sometimes the claim wins the race, sometimes not
        while not self.halt.is_set():
            name = self.rng.choice(self.names)
            kind = self.rng.choice(["link-out", "link-out", "link-in", "file", "fifo", "dir"])
            _replace(self.inbox / name, kind, self.outside, self.rng)
            time.sleep(self.rng.random() * 0.002)


def test_swapping_names_while_jobs_are_judged_and_claimed_never_reaches_outside(tmp_path):
    from nstd.config import load_config
    from nstd.daemon.inbox import Readiness, list_sidecars
    from nstd.daemon.intake import Intake
    from nstd.daemon.outcome import Outcomes
    from nstd.daemon.queue import JobQueue
    from nstd.state.status import Status
    from nstd.state.folders import Folders
    from nstd.state.store import Store

    outside = make_outside(tmp_path)
    before = {outside: snapshot(outside)}
    root = tmp_path / "var"
    folders = Folders(*(root / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    cfg = load_config(None)
    store, queue = Store(folders), JobQueue()
    readiness = Readiness(0.0, 0.0, 65536, folders.inbox)
    intake = Intake(cfg, readiness, store, Outcomes(cfg, store, Status(folders.state), queue), queue)
    (folders.inbox / "c-other.png").write_bytes(png(3))
    seen = {"claimed": 0, "quarantined": 0}
    for r in range(80):
        inbox = folders.inbox
        sub = inbox / "sub"  # the user puts their folder back (never writing through a link)
        if os.path.islink(sub) or (os.path.lexists(sub) and not sub.is_dir()):
            os.unlink(sub)
        sub.mkdir(exist_ok=True)
        for name, data in ((f"c{r}.png", png(r)), (f"sub/s{r}.png", png(r + 500))):
            try:
                (inbox / name).write_bytes(data)
            except OSError:
                pass
        (inbox / f"j{r}.yaml").write_text(f"content: c{r}.png\nstyle: sub/s{r}.png\n")
        swapper = Swapper(inbox, [f"c{r}.png", "sub", f"j{r}.yaml"], outside, seed=r)
        if r % 4:  # every fourth round nobody swaps: those jobs must be claimed
            swapper.start()
        try:
            for _ in range(20):
                readiness.update(list_sidecars(inbox))
                for verdict in readiness.check():
                    intake.take(verdict.pending, verdict.error)
                time.sleep(0.001)
        finally:
            swapper.halt.set()
            if swapper.is_alive():
                swapper.join()
        # settle whatever is still waiting (missing_timeout is 0: it is judged now)
        for _ in range(3):
            readiness.update(list_sidecars(inbox))
            for verdict in readiness.check():
                intake.take(verdict.pending, verdict.error)
        seen["claimed"] = len(queue)
        seen["quarantined"] = len(os.listdir(folders.quarantine))
    problems = audit_confinement(root, before)
    assert problems == [], problems[:10]
    assert seen["claimed"] > 5 and seen["quarantined"] > 5, seen  # both outcomes were exercised
    assert store.recover() is not None and audit_confinement(root, before) == []


# --------------------------------------------------------------------------- the real daemon


def test_the_daemon_under_a_swapping_user(tmp_path):
    outside = make_outside(tmp_path)
    before = {outside: snapshot(outside)}
    d = Daemon(tmp_path, watch={"settle_seconds": 0.05, "missing_timeout": 2.0, "rescan_seconds": 1.0})
    d.start()
    try:
        swappers = []
        for r in range(8):
            d.image("hoovertowernight.jpg", f"c{r}.jpg")
            d.image("starry_night.jpg", f"s{r}.jpg")
            d.drop(f"j{r}", {"content": f"c{r}.jpg", "style": f"s{r}.jpg"}, images=False)
            s = Swapper(d.inbox, [f"c{r}.jpg", f"s{r}.jpg"], outside, seed=1000 + r)
            s.start()
            swappers.append(s)
            time.sleep(0.3)
        time.sleep(2)
        for s in swappers:
            s.halt.set()
            s.join()
        d.drop("after", GOOD)
        d.wait_landed("after", timeout=60)
        d.wait(lambda: not [p for p in d.inbox.glob("j*.yaml")], 30, "every swapped job judged")
        assert d.alive()
    finally:
        assert d.stop() == 0
    assert audit_confinement(d.root, before) == []


def _fuzz_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    keys = ["content", "style", "size", "steps", "optimizer", "content_weight", "style_weight", "tv_weight", "init",
            "pooling", "content_layers", "style_layers", "seed", "style_scale", "gif", "output", "priority", "x"]
    odd = ["~", ".inf", "-.nan", "0x1F", "1e999", "-0", "!!binary aGVsbG8=", "2026-11-26", "'\\u0000'", "yes",
           '"\\ud800.jpg"', '"\\udcff"', "'.'", "'..'", "'/etc/passwd'", "'sub'", "'c.jpg\\n'", "[]", "{}", "''",
           '"\\u202e gpj.exe"', "'😀.jpg'", "'" + "a" * 5000 + "'", "[" + ", ".join(["s.jpg"] * 300) + "]",
           "{path: s.jpg, weight: .nan}", "!!python/name:os.system", "&a [1]", "*a", "!!set {a, b}", "? complex"]
    texts = [
        "[" * 1000 + "]" * 1000, "{a: " * 400 + "1" + "}" * 400, "- " * 2000 + "x", "content: " + "[" * 3000,
        "style: [" + ", ".join(f"{{path: s.jpg, weight: {i}}}" for i in range(150)) + "]\ncontent: c.jpg\n",
        "\ufeffcontent: c.jpg\nstyle: s.jpg\n", "content: c.jpg\nstyle: s.jpg\n" * 500, "\x00\x01\x02",
    ]
    while len(texts) < n:
        lines = [f"{rng.choice(keys)}: {rng.choice(odd)}" for _ in range(rng.randrange(1, 6))]
        texts.append("\n".join(lines) + "\n")
    return texts


def test_fuzzed_job_files_never_kill_or_stall_the_daemon(tmp_path):
    d = Daemon(tmp_path, watch={"settle_seconds": 0.05, "missing_timeout": 1.0, "rescan_seconds": 1.0})
    d.start()
    try:
        d.image("hoovertowernight.jpg", "c.jpg")
        d.image("starry_night.jpg", "s.jpg")
        (d.inbox / "sub").mkdir()
        texts = _fuzz_texts(seed=12, n=70)
        for i, text in enumerate(texts):
            tmp = d.inbox / f".f{i}.tmp"
            tmp.write_bytes(text.encode("utf-8", "surrogatepass"))
            os.rename(tmp, d.inbox / f"f{i}.yaml")
        d.wait(lambda: not list(d.inbox.glob("f*.yaml")), 120, "every fuzzed job judged")
        d.drop("after", GOOD)  # ... and the daemon still works
        d.wait_landed("after", timeout=60)
        assert d.alive() and d.status()["state"] == "running"
    finally:
        assert d.stop() == 0
    assert audit_confinement(d.root) == []
    assert len(os.listdir(d.quarantine)) + len(os.listdir(d.outbox)) == len(texts) + 1


def test_the_cases_of_the_issue(tmp_path):
    """content: '.', a subfolder's name, 2 KB of brackets, a lone surrogate, a job file that is a
    link to a FIFO in the inbox, 150 styles, and a SIGHUP with a rotation loguru refuses."""
    d = Daemon(tmp_path, watch={"settle_seconds": 0.1, "missing_timeout": 3.0})
    d.start()
    try:
        d.image("hoovertowernight.jpg")
        d.image("starry_night.jpg")
        (d.inbox / "other-user.part").write_bytes(b"half an upload")
        (d.inbox / "folder").mkdir()
        (d.inbox / "folder" / "kept.jpg").write_bytes(b"someone's file")
        os.mkfifo(d.inbox / "pipe")
        os.symlink("pipe", d.inbox / "piped.yaml")
        cases = {
            "dot": ("content: '.'\nstyle: starry_night.jpg\n", "names the inbox itself"),
            "folder": ("content: folder\nstyle: starry_night.jpg\n", "is a folder"),
            "brackets": ("[" * 1000 + "]" * 1000, "nested deeper than"),
            "surrogate": ('content: "\\ud800.jpg"\nstyle: starry_night.jpg\n', "not a valid file name"),
            "many-styles": ("content: hoovertowernight.jpg\nstyle: [" + ", ".join(["starry_night.jpg"] * 150) + "]\n",
                            "at most 16"),
        }
        for name, (text, _) in cases.items():
            d.drop(name, text, images=False)
        d.wait_quarantined(*cases, "piped", timeout=60)
        for name, (_, words) in cases.items():
            assert words in d.error(name)["message"], (name, d.error(name))
        assert "is a link" in d.error("piped")["message"]
        # nothing else of the inbox went with them
        assert (d.inbox / "other-user.part").read_bytes() == b"half an upload"
        assert (d.inbox / "folder" / "kept.jpg").read_bytes() == b"someone's file"
        assert (d.inbox / "pipe").exists()
        # the style they all name went with the last of them (named, reachable: the job's own)
        places = [p for p in (d.inbox, *(d.quarantine / n for n in cases)) if (p / "starry_night.jpg").exists()]
        assert len(places) == 1, places
        assert set(os.listdir(d.quarantine / "dot")) - {"starry_night.jpg"} == {"dot.yaml", "error.yaml", "job.log"}
        # an admin's reload with a value loguru refuses: refused, the daemon goes on
        d.write_config(logging={"rotation": "10 parsecs"})
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: "reload refused" in d.logs(), 30, "the reload to be refused")
        d.drop("after", GOOD)  # its own images: the broken jobs took theirs to the quarantine
        d.wait_landed("after", timeout=60)
        assert d.alive()
    finally:
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 30  # nothing blocks on the FIFO
    assert audit_confinement(d.root) == []


def test_a_second_daemon_on_the_same_root_exits_2(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        second = subprocess.run([*d.command(), "run", "--config", str(d.config)], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2
        assert f"another nstd (pid {d.proc.pid}) is running" in second.stderr and "Traceback" not in second.stderr
        assert d.alive()
    finally:
        assert d.stop() == 0
    d.start()  # the lock went with the first daemon
    assert d.stop() == 0


def _state_on(mnt, tmp_path):
    """A store whose state folder lies on `mnt` (another filesystem than the inbox's)."""
    from nstd.state.folders import Folders
    from nstd.state.store import Store

    folders = Folders(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "q", mnt / "state", tmp_path / "logs")
    folders.create()
    return folders, Store(folders)


def test_state_full_on_another_filesystem_leaves_nothing_in_the_inbox(tmp_path, small_fs):
    from test_faults_disk import fill

    from nstd.state.claim import JobFiles

    folders, store = _state_on(small_fs, tmp_path)
    big = os.urandom(400_000)
    (folders.inbox / "c.jpg").write_bytes(big)
    (folders.inbox / "j.yaml").write_text("content: c.jpg\nstyle: c.jpg\n")
    files = JobFiles(sidecar=folders.inbox / "j.yaml", content=folders.inbox / "c.jpg",
                     styles=[(folders.inbox / "c.jpg", 1.0)])
    for _ in range(3):  # each retry fails the same way and leaves nothing
        with pytest.raises(OSError):
            store.claim("j", files, set(), {})
        assert sorted(os.listdir(folders.inbox)) == ["c.jpg", "j.yaml"]
        assert (folders.inbox / "c.jpg").read_bytes() == big
        assert os.listdir(folders.jobs) == []
    fill(small_fs)  # no space even for the manifest: same
    with pytest.raises(OSError):
        store.claim("j", files, set(), {})
    assert sorted(os.listdir(folders.inbox)) == ["c.jpg", "j.yaml"]
    os.unlink(small_fs / "filler")
    (folders.inbox / "c.jpg").write_bytes(b"small")  # now it fits: claimed across filesystems
    job = store.claim("j", files, set(), {})
    assert os.listdir(folders.inbox) == [] and job.path(job.content).read_bytes() == b"small"


def test_a_copy_cut_short_is_rolled_back_without_a_trace(tmp_path):
    """kill -9 in the middle of a claim's copy across filesystems: recovery leaves the inbox as it was."""
    from nstd.state import safefs
    from nstd.state.folders import Folders
    from nstd.state.store import Store
    from nstd.state.transfer import Transfer

    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    (folders.inbox / "c.jpg").write_bytes(b"x" * 10_000)
    fd = safefs.open_inbox(folders.inbox)
    pin = safefs.pin(fd, folders.inbox, "c.jpg")
    t = Transfer(folders.jobs, "cut")
    t.put_pinned(pin, "inputs/c.jpg", copy=True)  # the manifest entry and a copy...
    (t.dir / "inputs" / "c.jpg").write_bytes(b"x" * 10)  # ...cut short
    t.entries[-1]["copy"] = False  # as a move across filesystems records it
    t._save_manifest()
    pin.close()
    os.close(fd)
    assert Store(folders).recover() == []
    assert os.listdir(folders.inbox) == ["c.jpg"] and (folders.inbox / "c.jpg").read_bytes() == b"x" * 10_000
    assert os.listdir(folders.jobs) == []


# --------------------------------------------------------------------------- without capabilities


def test_without_file_permission_capabilities_an_unreadable_job_is_quarantined(tmp_path):
    """The service user (here: nobody, no capabilities) cannot enter a user's private subfolder:
    that job is quarantined as unreadable at once, not retried forever; the others land."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become nobody")
    base = Path(tempfile.mkdtemp(prefix="nstd-nobody-"))  # pytest's tmp_path is root's alone
    base.chmod(0o755)
    request_cleanup = base
    d = Daemon(base, watch={"settle_seconds": 0.1, "missing_timeout": 600.0})
    d.root.mkdir(parents=True)
    (d.root / "inbox" / "private").mkdir(parents=True)
    d.image("starry_night.jpg", folder=d.inbox / "private")
    d.image("hoovertowernight.jpg")
    d.image("starry_night.jpg")
    subprocess.run(["chown", "-R", "nobody:nogroup", str(base)], check=True)
    (d.inbox / "private").chmod(0o000)  # the user made their folder unreadable while the job waits
    d.start(user="nobody", env={"HOME": str(base)})
    try:
        d.drop("locked", "content: hoovertowernight.jpg\nstyle: private/starry_night.jpg\n", images=False)
        d.wait_quarantined("locked", timeout=60)
        err = d.error("locked")
        assert err["kind"] == "unreadable" and "permission denied" in err["message"]
        assert "hoovertowernight.jpg" in os.listdir(d.quarantine / "locked")  # its content went with it
        d.image("hoovertowernight.jpg")
        d.drop("fine", GOOD, images=False)
        d.wait_landed("fine", timeout=60)
    finally:
        assert d.stop() == 0
        (d.inbox / "private").chmod(0o755)
    assert audit_confinement(d.root) == []
    shutil.rmtree(request_cleanup, ignore_errors=True)


def test_other_users_folders_leave_nothing_behind_unexplained(tmp_path):
    """Inputs in two other users' sub-folders, the service running as a third user (nobody): a
    style in bob's private (700) folder quarantines its job, and the job's content (at the top)
    goes with it instead of staying behind; inputs in alice's 755 folder (readable, but not the
    service's to move out of) are copied, the job runs, and its job.log says why they stayed.
    Before: the content stayed orphaned, and alice's job was held for ever ('cannot claim')."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become nobody")
    base = Path(tempfile.mkdtemp(prefix="nstd-nobody-"))
    base.chmod(0o755)
    d = Daemon(base, watch={"settle_seconds": 0.1, "missing_timeout": 600.0})
    d.root.mkdir(parents=True)
    for user in ("alice", "bob"):
        (d.inbox / user).mkdir(parents=True)
        d.image("starry_night.jpg", folder=d.inbox / user)
    d.image("hoovertowernight.jpg", folder=d.inbox / "alice")
    d.image("hoovertowernight.jpg")
    subprocess.run(["chown", "-R", "nobody:nogroup", str(base)], check=True)
    subprocess.run(["chown", "-R", "daemon:daemon", str(d.inbox / "alice"), str(d.inbox / "bob")], check=True)
    (d.inbox / "alice").chmod(0o755)
    (d.inbox / "bob").chmod(0o700)
    d.start(user="nobody", env={"HOME": str(base)})
    try:
        d.drop("private", "content: hoovertowernight.jpg\nstyle: bob/starry_night.jpg\n", images=False)
        d.drop("shared", "content: alice/hoovertowernight.jpg\nstyle: alice/starry_night.jpg\n", images=False)
        d.wait_quarantined("private", timeout=60)
        assert d.error("private")["kind"] == "unreadable"
        assert sorted(os.listdir(d.quarantine / "private")) == [
            "error.yaml", "hoovertowernight.jpg", "job.log", "private.yaml"]
        d.wait_landed("shared", timeout=60)
        log = (d.outbox / "shared" / "job.log").read_text()
        assert "alice/hoovertowernight.jpg: its folder is not the service's to write" in log
        assert sorted(os.listdir(d.inbox / "alice")) == ["hoovertowernight.jpg", "starry_night.jpg"]
        assert sorted(p.name for p in d.inbox.iterdir()) == ["alice", "bob"]
    finally:
        assert d.stop() == 0
        (d.inbox / "bob").chmod(0o755)
    assert audit_confinement(d.root) == []
    shutil.rmtree(base, ignore_errors=True)


def test_a_job_nstd_cannot_claim_is_held_with_its_reason_in_status(tmp_path, small_fs):
    """A full state folder: the job is held and retried, and `nstd status` says why, not silence."""
    from test_faults_disk import fill

    from nstd.config import load_config
    from nstd.daemon.inbox import Readiness, list_sidecars
    from nstd.daemon.intake import Intake
    from nstd.daemon.outcome import Outcomes
    from nstd.daemon.queue import JobQueue
    from nstd.commands.status import describe
    from nstd.state.status import Status

    folders, store = _state_on(small_fs, tmp_path)
    queue, status = JobQueue(), Status(tmp_path)
    readiness = Readiness(0.0, 600.0, 65536, folders.inbox)
    intake = Intake(load_config(None), readiness, store, Outcomes(load_config(None), store, status, queue), queue)
    (folders.inbox / "c.png").write_bytes(png(1, 64))
    (folders.inbox / "j.yaml").write_text("content: c.png\nstyle: c.png\n")
    fill(small_fs)
    readiness.update(list_sidecars(folders.inbox))
    for verdict in readiness.check():
        intake.take(verdict.pending, verdict.error)
    [held] = readiness.waiting()
    assert held["job"] == "j.yaml" and "cannot claim" in held["reason"] and "No space left" in held["reason"]
    assert sorted(os.listdir(folders.inbox)) == ["c.png", "j.yaml"] and len(queue) == 0
    status.update(force=True, waiting=readiness.waiting())
    text, _ = describe(status.data)
    assert "j.yaml: held: cannot claim" in text and "tried again in" in text


# --------------------------------------------------------------------------- found by a hostile helper


def _store(tmp_path):
    from nstd.state.folders import Folders
    from nstd.state.store import Store

    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    return Store(folders)


def test_a_file_named_like_the_manifest_is_kept(tmp_path):
    store = _store(tmp_path)
    (store.inbox / ".nstd-manifest.json").write_text("a user's own file")
    (store.inbox / "q.yaml").write_text("content: .nstd-manifest.json\n")
    final = store.quarantine_from_inbox("q", store.inbox / "q.yaml", [store.inbox / ".nstd-manifest.json"], set(),
                                        {"kind": "bad"}, "")
    assert (final / ".nstd-manifest.json-2").read_text() == "a user's own file"


def test_a_name_swapped_between_pin_and_move_goes_back_and_nothing_is_lost(tmp_path):
    from nstd.state import safefs
    from nstd.state.transfer import Transfer

    store = _store(tmp_path)
    (store.inbox / "big.png").write_bytes(b"what was checked")
    for n in ["big.png.restored", *(f"big.png.restored-{i}" for i in range(2, 120))]:
        (store.inbox / n).write_bytes(b"taken")  # every put-back name a hostile user could pre-take
    fd = safefs.open_inbox(store.inbox)
    pin = safefs.pin(fd, store.inbox, "big.png")
    (store.inbox / "precious.dat").write_bytes(b"precious")
    os.rename(store.inbox / "precious.dat", store.inbox / "big.png")  # swapped in after the pin
    t = Transfer(store.jobs, "swap")
    with pytest.raises(safefs.Refused, match="was replaced"):
        t.put_pinned(pin, "inputs/big.png")
    pin.close()
    os.close(fd)
    kept = [p for p in store.inbox.iterdir() if p.read_bytes() == b"precious"]
    assert len(kept) == 1 and not (t.dir / "inputs" / "big.png").exists()
    assert [e["to"] for e in t.entries] == []  # it left the manifest only once it was back


def test_a_job_file_too_long_to_rename_aside_is_judged_once(tmp_path):
    store = _store(tmp_path)
    long_name = "a" * 246 + ".yaml"
    os.symlink("/etc/hostname", store.inbox / long_name)
    final = store.quarantine_from_inbox("a", store.inbox / long_name, [], set(), {"kind": "x"}, "")
    assert not os.path.lexists(store.inbox / long_name)
    [aside] = [p for p in store.inbox.iterdir() if p.name.startswith(".nstd-refused-")]
    assert aside.is_symlink() and "left in the inbox as .nstd-refused-" in (final / "job.log").read_text()


def test_hard_links_and_huge_sparse_files_are_refused(tmp_path):
    from nstd.config import load_config
    from nstd.job.check import check_job
    from nstd.job.file import ParsedJob, resolve_files
    from nstd.errors import JobError

    outside = make_outside(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.link(outside / "secret.png", inbox / "hl.png")
    with pytest.raises(JobError) as info:
        resolve_files({"content": "hl.png", "style": "hl.png"}, inbox / "j.yaml", inbox)
    assert info.value.kind == "path outside inbox" and "hard link" in info.value.message
    (inbox / "sparse.png").write_bytes(png(1))
    os.truncate(inbox / "sparse.png", 2**31)  # 2 GB that take a few KB: every copy would write them out
    with pytest.raises(JobError, match="is a sparse file"):
        resolve_files({"content": "sparse.png", "style": "sparse.png"}, inbox / "j.yaml", inbox)
    (inbox / "big.png").write_bytes(os.urandom(200_000))
    (inbox / "j.yaml").write_text("x")
    files = resolve_files({"content": "big.png", "style": "big.png"}, inbox / "j.yaml", inbox)
    with pytest.raises(JobError, match="200,000 bytes, over the limit of 100,000"):
        cfg = load_config(None)
        check_job(ParsedJob({}, files, cfg["defaults"]), {**cfg["limits"], "max_input_bytes": 100_000})


def test_a_burst_of_signals_never_deadlocks_the_daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        for _ in range(5):
            for _ in range(200):
                d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        d.drop("after", GOOD)
        d.wait_landed("after", timeout=60)
    finally:
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 30


def test_a_file_written_to_between_check_and_claim_goes_back(tmp_path):
    from nstd.state import safefs
    from nstd.state.transfer import Transfer

    store = _store(tmp_path)
    (store.inbox / "grow.png").write_bytes(b"small")
    fd = safefs.open_inbox(store.inbox)
    pin = safefs.pin(fd, store.inbox, "grow.png")
    with open(store.inbox / "grow.png", "ab") as held:  # a descriptor the user kept open
        held.write(b"x" * 100_000)
    t = Transfer(store.jobs, "grow")
    with pytest.raises(safefs.Refused, match="written to"):
        t.put_pinned(pin, "inputs/grow.png")
    pin.close()
    os.close(fd)
    assert (store.inbox / "grow.png").stat().st_size == 100_005 and not (t.dir / "inputs" / "grow.png").exists()


def test_moving_aside_never_replaces(tmp_path):
    from nstd.state import safefs

    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("a")
    (d / "b").write_text("b")
    fd = os.open(d, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            safefs.rename_noreplace(fd, "a", fd, "b")
        safefs.rename_noreplace(fd, "a", fd, "c")
    finally:
        os.close(fd)
    assert {p.name: p.read_text() for p in d.iterdir()} == {"b": "b", "c": "a"}


def test_a_quarantined_job_leaves_files_other_jobs_wait_for(tmp_path):
    store = _store(tmp_path)
    (store.inbox / "style.png").write_bytes(png(5))
    (store.inbox / "q.yaml").write_text("content: style.png\n")
    shared = {store.inbox / "style.png"}
    final = store.quarantine_from_inbox("q", store.inbox / "q.yaml", [store.inbox / "style.png"], shared,
                                        {"kind": "bad"}, "")
    assert (store.inbox / "style.png").exists() and sorted(os.listdir(final)) == ["error.yaml", "job.log", "q.yaml"]
    assert "style.png: named by another waiting job; left in the inbox for it" in (final / "job.log").read_text()


def test_an_input_grown_after_its_claim_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import yaml as yaml_

    from test_worker import claim, make_worker

    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    job = claim(store, w.cfg["defaults"])
    with open(job.path(job.content), "r+b") as held:  # the dropper's descriptor, still open
        held.truncate(2**33)
    w.process(job)
    err = yaml_.safe_load((store.f.quarantine / "j" / "error.yaml").read_text())
    assert err["kind"] == "input changed" and "8,589,934,592 bytes" in err["message"]


def test_only_the_judged_job_file_is_remembered_as_refused(tmp_path):
    from nstd.daemon.inbox import Readiness

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.symlink("/etc/hostname", inbox / "x.yaml")
    r = Readiness(0.0, 1.0, 65536, inbox)
    judged = (inbox / "x.yaml").lstat()
    os.unlink(inbox / "x.yaml")
    (inbox / "x.yaml").write_text("{}")  # a new file under the judged name
    r.refuse(inbox / "x.yaml", judged)
    r.update([inbox / "x.yaml"])
    assert inbox / "x.yaml" in r.pending  # the new one is judged


def _start_refused(tmp_path: Path, mutate) -> subprocess.CompletedProcess:
    import sys

    var = tmp_path / "var"
    for d in ("inbox", "outbox", "quarantine", "state", "logs"):
        (var / d).mkdir(parents=True, exist_ok=True)
    for d in (var, var / "outbox", var / "quarantine", var / "state", var / "logs"):
        os.chmod(d, 0o755)
    mutate(var)
    (tmp_path / "config.yaml").write_text(f"paths: {{root: {var}}}\nweb: {{enabled: false}}\nengine: {{device: cpu}}\n")
    return subprocess.run([sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, mutate, says", [
    ("group-writable state", lambda v: os.chmod(v / "state", 0o2775), "paths.state"),
    ("world-writable root", lambda v: os.chmod(v, 0o777), "paths.root"),
    ("group-writable outbox", lambda v: os.chmod(v / "outbox", 0o775), "paths.outbox"),
    ("quarantine swapped for a link", lambda v: (shutil.rmtree(v / "quarantine"), (v / "elsewhere").mkdir(),
                                                 os.symlink(v / "elsewhere", v / "quarantine")), "is a symbolic link"),
])
def test_the_service_refuses_folders_others_can_change(tmp_path, name, mutate, says):
    """A member of the inbox's group must not be able to replace state/ (claims, leases, cancel
    requests) or the quarantine, nor delete others' results: the daemon refuses to start, naming
    the folder and the fix, as sshd refuses a loose key file. The group-writable inbox is fine."""
    r = _start_refused(tmp_path, mutate)
    assert r.returncode == 2, (name, r.stderr)
    assert says in r.stderr and ("chmod go-w" in r.stderr or "real folder" in r.stderr), r.stderr


def test_a_group_inbox_and_a_loose_umask_still_start(tmp_path):
    """The inbox is the group's (2775); folders the daemon creates are 0755 whatever the umask."""
    def mutate(var):
        os.chmod(var / "inbox", 0o2775)
        shutil.rmtree(var / "outbox")
    old = os.umask(0o002)
    try:
        r = _start_refused(tmp_path, mutate)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "var" / "outbox").st_mode) == 0o755
