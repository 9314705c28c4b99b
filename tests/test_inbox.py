"""Readiness: settle time, half-written sidecars, missing inputs; ignore rules. A fake clock."""
import pytest

from nstd.daemon.inbox import Readiness, is_ignored, list_sidecars


@pytest.mark.parametrize("name", [".hidden.yaml", "x.yaml.tmp", "a.part", "b.crdownload", "~$doc.yaml", "._x.yaml",
                                  ".DS_Store", "Thumbs.db", "desktop.ini", "@eaDir", ".stfolder", "x.yaml~"])
def test_ignored_names(name):
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["job.yaml", "my job.yml", "ünïcode.yaml", "photo.jpg"])
def test_normal_names(name):
    assert not is_ignored(name)


def test_list_sidecars_skips_litter_and_subfolders(tmp_path):
    for n in ("a.yaml", "b.yml", ".c.yaml", "d.yaml.part", "e.jpg"):
        (tmp_path / n).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.yaml").write_text("")
    assert [p.name for p in list_sidecars(tmp_path)] == ["a.yaml", "b.yml"]


def make(tmp_path, settle=2.0, missing=10.0):
    return Readiness(settle, missing, 65536, tmp_path)


def test_ready_only_after_everything_settles(tmp_path):
    (tmp_path / "c.jpg").write_bytes(b"1")
    (tmp_path / "j.yaml").write_text("content: c.jpg\nstyle: s.jpg\n")
    r = make(tmp_path)
    r.update(list_sidecars(tmp_path), now=0)
    assert r.check(now=0) == []  # s.jpg missing
    (tmp_path / "s.jpg").write_bytes(b"12")
    assert r.check(now=1) == []  # first time complete: starts settling
    (tmp_path / "s.jpg").write_bytes(b"123")  # still growing
    assert r.check(now=2.5) == []
    assert r.check(now=4.0) == []  # 1.5 s stable
    [v] = r.check(now=4.6)
    assert v.ready and v.error is None


def test_missing_input_after_timeout(tmp_path):
    (tmp_path / "j.yaml").write_text("content: c.jpg\nstyle: s.jpg\n")
    r = make(tmp_path, missing=10)
    r.update(list_sidecars(tmp_path), now=0)
    assert r.check(now=9) == []
    [v] = r.check(now=10)
    assert v.error.kind == "missing input" and "c.jpg, s.jpg" in v.error.message


def test_broken_sidecar_gets_time_to_finish(tmp_path):
    (tmp_path / "j.yaml").write_text("content: [half")
    r = make(tmp_path)
    r.update(list_sidecars(tmp_path), now=0)
    assert r.check(now=1) == []
    (tmp_path / "j.yaml").write_text("content: [half, written")
    assert r.check(now=2.5) == []
    [v] = r.check(now=5)
    assert v.error.kind == "invalid job file"


def test_waiting_references_name_shared_files(tmp_path):
    for n in ("c1.jpg", "c2.jpg", "s.jpg"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "a.yaml").write_text("content: c1.jpg\nstyle: s.jpg\n")
    (tmp_path / "b.yaml").write_text("content: c2.jpg\nstyle: s.jpg\n")
    r = make(tmp_path)
    r.update(list_sidecars(tmp_path), now=0)
    r.check(now=0)
    assert r.waiting_references(exclude=tmp_path / "a.yaml") == {tmp_path / "c2.jpg", tmp_path / "s.jpg"}


def test_a_job_file_caught_mid_rewrite_is_not_taken_for_one_that_waits(tmp_path):
    """A job file read while it is being rewritten (empty for an instant) names by convention
    inputs that are not there: it must settle before it counts as waiting for them, so
    --until-empty does not leave it, nor the intake quarantine it as missing input."""
    (tmp_path / "c.jpg").write_bytes(b"x")
    (tmp_path / "s.jpg").write_bytes(b"x")
    (tmp_path / "j.yaml").write_text("")  # caught between the truncation and the write
    r = make(tmp_path, settle=2.0, missing=30.0)
    r.update(list_sidecars(tmp_path), now=0)
    assert r.check(now=0) == []
    (tmp_path / "j.yaml").write_text("content: c.jpg\nstyle: s.jpg\n")  # ... written
    assert r.check(now=1) == [] and not r.settled(now=1)  # seen changing: not waiting for j.content.jpg
    (tmp_path / "j.yaml").write_text("")  # rewritten again, and caught empty again
    assert r.check(now=11) == [] and not r.settled(now=11)  # neither missing input nor settled
    assert r.check(now=13.5) == [] and r.settled(now=13.5)  # settled empty: now it waits for its inputs
