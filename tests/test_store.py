"""The on-disk lifecycle, and recovery from a crash in the middle of each transfer."""
import json
import os

import pytest

from nstd.state.claim import JobFiles
from nstd.state.folders import Folders
from nstd.state.store import Store
from nstd.state.transfer import Transfer


@pytest.fixture
def store(tmp_path):
    f = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    f.create()
    return Store(f)


def drop(store, name="j", shared_style=False):
    inbox = store.f.inbox
    (inbox / f"{name}.jpg").write_bytes(b"content-" + name.encode())
    (inbox / "style.jpg").write_bytes(b"style")
    (inbox / f"{name}.yaml").write_text(f"content: {name}.jpg\nstyle: style.jpg\n")
    return JobFiles(sidecar=inbox / f"{name}.yaml", content=inbox / f"{name}.jpg", styles=[(inbox / "style.jpg", 1.0)])


def everything(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "status.json")


def test_claim_deliver(store):
    files = drop(store)
    job = store.claim("j", files, shared=set(), settings={"priority": 0})
    assert sorted(os.listdir(store.f.inbox)) == []
    assert sorted(os.listdir(job.inputs_dir)) == ["j.jpg", "j.yaml", "style.jpg"]
    assert job.path(job.styles[0]).read_bytes() == b"style"
    final = store.deliver(job, {"j.png": b"png", "report.json": b"{}"})
    assert final == store.f.outbox / "j"
    assert sorted(os.listdir(final)) == ["inputs", "j.png", "report.json"]
    assert not job.folder.exists()


def test_shared_files_are_copied_and_stay(store):
    files = drop(store)
    job = store.claim("j", files, shared={files.styles[0][0]}, settings={"priority": 0})
    assert (store.f.inbox / "style.jpg").read_bytes() == b"style"
    assert job.path(job.styles[0]).read_bytes() == b"style"


def test_names_never_collide(store):
    for expected in ("j", "j-2", "j-3"):
        job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
        assert store.deliver(job, {"r.png": b"x"}).name == expected


def test_quarantine_from_inbox_keeps_inputs_beside_error(store):
    files = drop(store, name="error")  # a job named "error": its sidecar must not clash with error.yaml
    final = store.quarantine_from_inbox("error", files.sidecar, files.inputs(), set(), {"kind": "bad"}, "log line\n")
    names = sorted(os.listdir(final))
    assert "error.yaml" in names and "job.log" in names and "error.jpg" in names and "style.jpg" in names
    assert "error-2.yaml" in names  # the user's sidecar, under the one free-name rule (nstd/state/names.py)
    assert os.listdir(store.f.inbox) == []


def test_recover_rolls_back_a_half_done_claim(store):
    files = drop(store)
    t = Transfer(store.f.jobs, "crashed")
    t.put(files.content, "inputs/j.jpg")  # ...then the power went out
    store2 = Store(store.f)
    assert store2.recover() == []
    assert sorted(os.listdir(store.f.inbox)) == ["j.jpg", "j.yaml", "style.jpg"]
    assert os.listdir(store.f.jobs) == []


def test_recover_rolls_back_a_half_done_delivery(store):
    job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
    t = Transfer(store.f.outbox, job.id)
    (t.dir / "j.png").write_bytes(b"png")
    t.put(job.inputs_dir / "j.jpg", "inputs/j.jpg")
    [again] = Store(store.f).recover()
    assert again.id == job.id and sorted(os.listdir(again.inputs_dir)) == ["j.jpg", "j.yaml", "style.jpg"]
    assert os.listdir(store.f.outbox) == []


def test_a_delivery_appears_with_its_files_only(store, monkeypatch):
    """The folder a reader sees appear never holds the manifest, not even between the rename and
    the clean-up (an rsync started by the rename would copy it, then find it vanished)."""
    from nstd.state import transfer

    job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
    seen = {}
    real = transfer.fsync_dir

    def watch(folder):
        if folder == store.f.outbox:  # the commit's first step after the rename
            seen.update({p.name: sorted(os.listdir(p)) for p in folder.iterdir() if not p.name.startswith(".")})
        real(folder)

    monkeypatch.setattr(transfer, "fsync_dir", watch)
    store.deliver(job, {"j.png": b"png", "report.json": b"{}"})
    assert seen == {"j": ["inputs", "j.png", "report.json"]}
    assert os.listdir(store.f.outbox) == ["j"]  # and nothing of the transfer is left beside it


def test_a_commit_cut_short_before_its_clean_up_is_recovered_as_delivered(store, monkeypatch):
    from nstd.state import transfer

    job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
    t = Transfer(store.f.outbox, job.id)
    (t.dir / "j.png").write_bytes(b"png")
    t.put(job.inputs_dir / "j.jpg", "inputs/j.jpg")
    monkeypatch.setattr(transfer.shutil, "rmtree", lambda *a, **k: None)  # the power goes out after the rename
    final = t.commit(store.f.outbox / "j")
    monkeypatch.undo()
    assert t.root.is_dir()
    Store(store.f).recover()
    assert sorted(os.listdir(store.f.outbox)) == ["j"]  # the manifest's leftover gone, nothing taken back
    assert sorted(os.listdir(final / "inputs")) == ["j.jpg"]


def test_a_rollback_cut_short_is_finished_by_the_next(store, monkeypatch):
    from nstd.state import transfer

    job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
    t = Transfer(store.f.outbox, job.id)
    t.put(job.inputs_dir / "j.jpg", "inputs/j.jpg")
    t.put(job.inputs_dir / "style.jpg", "inputs/style.jpg")
    moves = []

    def die_after_one(src, dst):
        if moves:
            raise KeyboardInterrupt  # kill -9, as near as a test gets
        moves.append(src)
        os.rename(src, dst)

    monkeypatch.setattr(transfer, "move_file", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        transfer.rollback(t.root)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        t.commit(store.f.outbox / "j")  # its maker, waking up: the payload was taken first
    assert transfer.rollback(t.root) == 1
    assert sorted(os.listdir(job.inputs_dir)) == ["j.jpg", "j.yaml", "style.jpg"]
    assert os.listdir(store.f.outbox) == []


def test_a_transfer_of_the_layout_before_payload_is_still_rolled_back(store):
    """Left by an nstd of before 2026-12-07 (files beside the manifest, `.nstd-tmp-`): recovery
    and a cluster's reclaim both put its files back."""
    from nstd.state.transfer import LEGACY_PREFIX, MANIFEST

    for how in ("recover", "reclaim"):
        job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
        old = store.f.outbox / f"{LEGACY_PREFIX}{job.id}"
        (old / "inputs").mkdir(parents=True)
        (old / "j.png").write_bytes(b"png")
        entry = {"from": str(job.inputs_dir / "j.jpg"), "to": "inputs/j.jpg", "copy": False}
        (old / MANIFEST).write_text(json.dumps({"entries": [entry]}))
        os.rename(job.inputs_dir / "j.jpg", old / "inputs" / "j.jpg")
        if how == "recover":
            [again] = Store(store.f).recover()
            assert again.id == job.id
        else:
            assert Store(store.f).reclaim(job.id) == 1
        assert sorted(os.listdir(job.inputs_dir)) == ["j.jpg", "j.yaml", "style.jpg"], how
        assert os.listdir(store.f.outbox) == [], how
        store.deliver(job, {"j.png": b"png"})
        drop_state = store.f.outbox / "j"
        assert sorted(os.listdir(drop_state)) == ["inputs", "j.png"]
        os.rename(drop_state, store.f.outbox.parent / f"delivered-{how}")


def test_recover_drops_delivered_state_and_keeps_claimed(store):
    job = store.claim("j", drop(store), shared=set(), settings={"priority": 0})
    delivered = store.f.jobs / "old"
    delivered.mkdir()
    (delivered / "claim.json").write_text(json.dumps({"id": "old", "name": "x"}))
    [found] = Store(store.f).recover()
    assert found.id == job.id and not delivered.exists()


def test_layout_check(tmp_path):
    f = Folders(tmp_path / "in", tmp_path / "in" / "out", tmp_path / "q", tmp_path / "s", tmp_path / "l")
    with pytest.raises(ValueError, match="outbox.*inside the inbox"):
        f.check_layout()
    f = Folders(tmp_path / "root" / "in", tmp_path / "o", tmp_path / "q", tmp_path / "root", tmp_path / "l")
    with pytest.raises(ValueError, match="inbox.*lies inside paths.state"):
        f.check_layout()


@pytest.mark.parametrize("name, taken, keep_suffix, mark, expected", [
    ("j", set(), False, "", "j"),
    ("j", {"j"}, False, "", "j-2"),
    ("j", {"j", "j-2"}, False, "", "j-3"),
    ("x.final", {"x.final"}, False, "", "x.final-2"),  # a folder: no suffix to keep
    ("a.jpg", {"a.jpg", "a-2.jpg"}, True, "", "a-3.jpg"),  # a user's file keeps its type
    ("error.yaml", {"error.yaml"}, True, "", "error-2.yaml"),
    (".nstd-manifest.json", {".nstd-manifest.json"}, True, "", ".nstd-manifest.json-2"),  # hidden: whole
    ("job", {"job"}, False, "retry-", "job-retry-2"),
])
def test_one_rule_for_a_free_name(name, taken, keep_suffix, mark, expected):
    from nstd.state.names import free_name

    assert free_name(name, taken.__contains__, keep_suffix, mark) == expected
