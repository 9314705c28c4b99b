"""Sidecar parsing and path resolution: hostile YAML and paths that try to leave the inbox."""
import os

import pytest
import yaml

from nstd.job.file import read_sidecar, resolve_files, job_settings
from nstd.errors import JobError
from nstd.config import load_config


def sidecar(tmp_path, text: str, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("content: [unclosed\n", "invalid job file", "not valid YAML"),
        ("- a\n- b\n", "invalid job file", "expected a mapping of keys, got list"),
        ("a: &x [1, 2]\nb: *x\n", "invalid job file", "anchors and aliases are not allowed"),
        ("content: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "invalid job file", "not valid YAML"),
        ("size: !!python/name:os.system\n", "invalid job file", "not valid YAML"),
    ],
)
def test_hostile_yaml(tmp_path, text, kind, message):
    with pytest.raises(JobError, match=message) as info:
        read_sidecar(sidecar(tmp_path, text), 65536)
    assert info.value.kind == kind
    assert not os.path.exists("/tmp/pwned")


def test_billion_laughs_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 9) + "]" for i in range(1, 10)]
    with pytest.raises(JobError, match="anchors and aliases"):
        read_sidecar(sidecar(tmp_path, "\n".join(lines)), 65536)


def test_size_limit(tmp_path):
    with pytest.raises(JobError, match="larger than 100 bytes"):
        read_sidecar(sidecar(tmp_path, "steps: 1\n" + "#" * 200), 100)


def test_paths_must_stay_inside_the_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", inbox / "link.jpg")
    cases = {
        "content: ../secret.jpg\nstyle: s.jpg\n": "'..' is not allowed",
        "content: /etc/passwd\nstyle: s.jpg\n": "absolute path",
        "content: link.jpg\nstyle: s.jpg\n": "link that leads out",
        "content: c.jpg\nstyle: [{path: sub/../../secret.jpg, weight: 1}]\n": "'..' is not allowed",
    }
    for text, message in cases.items():
        with pytest.raises(JobError, match=message) as info:
            resolve_files(yaml.safe_load(text), sidecar(inbox, text), inbox)
        assert info.value.kind == "path outside inbox"


def test_subfolders_are_fine_and_links_even_inside_are_refused(tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "s.jpg").write_bytes(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    files = resolve_files({"content": "c.jpg", "style": "styles/s.jpg"}, tmp_path / "j.yaml", tmp_path)
    assert files.content == tmp_path / "c.jpg" and files.styles == [(tmp_path / "styles" / "s.jpg", 1.0)]
    # a link inside the inbox today may lead out tomorrow: nstd never follows one
    os.symlink("c.jpg", tmp_path / "alias.jpg")
    os.symlink("styles", tmp_path / "linked")
    for name, words in (("alias.jpg", "'alias.jpg' is a link"), ("linked/s.jpg", "leads through 'linked', a link")):
        with pytest.raises(JobError) as info:
            resolve_files({"content": name, "style": "styles/s.jpg"}, tmp_path / "j.yaml", tmp_path)
        assert info.value.kind == "path outside inbox" and words in info.value.message
    for value, words in ((".", "names the inbox itself"), ("styles", "is a folder")):
        with pytest.raises(JobError) as info:
            resolve_files({"content": value, "style": "styles/s.jpg"}, tmp_path / "j.yaml", tmp_path)
        assert info.value.kind == "invalid job file" and words in info.value.message


def test_convention_names_and_blends(tmp_path):
    for n in ("x.content.png", "x.style.jpg"):
        (tmp_path / n).write_bytes(b"x")
    files = resolve_files({}, tmp_path / "x.yaml", tmp_path)
    assert files.content.name == "x.content.png" and files.styles[0][0].name == "x.style.jpg"
    assert files.missing == [tmp_path / "x.yaml"]  # the sidecar itself was not written in this test
    blend = resolve_files({"content": "a.jpg", "style": [{"path": "b.jpg", "weight": 0.7}, "c.jpg"]},
                          tmp_path / "y.yaml", tmp_path)
    assert [w for _, w in blend.styles] == pytest.approx([0.7 / 1.7, 1 / 1.7])  # normalised, as job.yaml records
    assert blend.weight_sum == pytest.approx(1.7)
    assert {p.name for p in blend.missing} == {"a.jpg", "b.jpg", "c.jpg", "y.yaml"}
    with pytest.raises(JobError, match=r"style\[0\]: expected a file name or"):
        resolve_files({"style": [{"file": "b.jpg"}]}, tmp_path / "z.yaml", tmp_path)


def test_a_named_init_is_not_a_file_and_a_file_named_like_one_still_is(tmp_path):
    from nstd.engine.options import NAMED_INITS
    from nstd.job.spec import Job
    defaults = load_config(None)["defaults"]
    for name in NAMED_INITS:
        files = resolve_files({"content": "a.jpg", "style": "b.jpg", "init": name}, tmp_path / "j.yaml", tmp_path)
        assert files.init is None
        job = Job.of(job_settings({"content": "a.jpg", "style": "b.jpg", "init": name}, defaults))
        assert job.params().init == name
    files = resolve_files({"content": "a.jpg", "style": "b.jpg", "init": "color-matched.png"}, tmp_path / "j.yaml", tmp_path)
    assert files.init == tmp_path / "color-matched.png"


def test_settings_name_the_key():
    defaults = load_config(None)["defaults"]
    assert job_settings({"content": "a", "style": "b", "steps": 5}, defaults)["steps"] == 5
    with pytest.raises(JobError, match="colour: unknown key"):
        job_settings({"colour": "red"}, defaults)
    with pytest.raises(JobError, match="size: expected an integer from 32 to 8192, got 100000"):
        job_settings({"size": 100000}, defaults)
