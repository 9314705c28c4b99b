"""Regions from the job side (issue #31): a mask per style and a `keep` mask are inputs like any
other (read, waited for, refused, claimed, quarantined, delivered and retried with the job), and a
mask whose aspect ratio is not the content's is refused naming its key, by `nstd validate`, the
daemon and `nstd stylize` alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from harness import Daemon
from nstd.commands.retry import retry
from nstd.commands.validate import check_one
from nstd.config import load_config
from nstd.errors import ErrorKind, JobError
from nstd.job.check import check_job
from nstd.job.file import FILE_KEYS, parse_job, resolve_files
from nstd.state.claim import Claim
from nstd.state.folders import Folders
from nstd.state.store import Store

#: content 4:3 (at size 32: 32x24, as the other daemon tests), its masks 4:3 too
CONTENT, MASK, SQUARE = (64, 48), (32, 24), (32, 32)


def picture(path: Path, size, colour="white", mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "noise":
        Image.effect_noise(size, 60).convert("RGB").save(path)
    else:
        Image.new(mode, size, colour).save(path)
    return path


def half_mask(path: Path, size=MASK, left=True) -> Path:
    """White on one half (this style), black on the other."""
    img = Image.new("L", size, 0)
    w, h = size
    img.paste(255, (0, 0, w // 2, h) if left else (w // 2, 0, w, h))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def masked_job(folder: Path, name="j", extra: str = "", sub: str = "") -> Path:
    """content, two styles each with a mask (`sub`: the masks in a sub-folder), a keep mask."""
    picture(folder / f"{name}-c.png", CONTENT, "blue")
    picture(folder / f"{name}-s1.png", (40, 40), mode="noise")
    picture(folder / f"{name}-s2.png", (40, 40), "orange")
    half_mask(folder / sub / f"{name}-left.png")
    half_mask(folder / sub / f"{name}-right.png", left=False)
    picture(folder / f"{name}-keep.png", MASK, "black", mode="L")
    sidecar = folder / f"{name}.yaml"
    sidecar.write_text(f"content: {name}-c.png\n"
                       f"style:\n- {{path: {name}-s1.png, mask: {sub}{name}-left.png}}\n"
                       f"- {{path: {name}-s2.png, weight: 2, mask: {sub}{name}-right.png}}\n"
                       f"keep: {name}-keep.png\nsize: 32\nsteps: 2\ngif: false\n{extra}")
    return sidecar


def parsed(sidecar: Path):
    cfg = load_config(None)
    return parse_job(sidecar, sidecar.parent, cfg["defaults"], 65536)


# ------------------------------------------------------------------ the job file


def test_masks_and_keep_are_inputs_of_the_job(tmp_path):
    files = parsed(masked_job(tmp_path, sub="masks/")).files
    assert "keep" in FILE_KEYS
    assert [m.name for m in files.masks] == ["j-left.png", "j-right.png"]
    assert files.keep == tmp_path / "j-keep.png"
    assert [p.relative_to(tmp_path).as_posix() for p in files.inputs()] == [
        "j-c.png", "j-s1.png", "j-s2.png", "masks/j-left.png", "masks/j-right.png", "j-keep.png", "j.yaml"]
    assert [round(w, 3) for _, w in files.styles] == [0.333, 0.667]
    assert files.missing == []


def test_styles_may_share_a_mask_and_go_without_one(tmp_path):
    for n in ("c", "a", "b", "m"):
        picture(tmp_path / f"{n}.png", CONTENT)
    files = resolve_files({"content": "c.png", "style": ["a.png", {"path": "b.png", "mask": "m.png"},
                                                        {"path": "a.png", "mask": "m.png"}]},
                          tmp_path / "j.yaml", tmp_path)
    assert [files.mask(i) and files.mask(i).name for i in range(3)] == [None, "m.png", "m.png"]
    assert [k for k, _ in files.mask_keys()] == ["style[1].mask", "style[2].mask"]
    assert [p.name for p in files.inputs()] == ["c.png", "a.png", "b.png", "m.png", "j.yaml"]  # each once


@pytest.mark.parametrize("style, says", [
    ([{"path": "s.png", "mask": "m.png", "maks": "x"}], "style[0]: expected a file name or {path: FILE, weight: NUMBER, mask: FILE}"),
    ([{"path": "s.png", "mask": 3}], "style[0].mask: expected a file name, got 3"),
    ({"path": "s.png", "mask": "m.png"}, "[{path: a.jpg, mask: sky.png}]"),
])
def test_a_wrong_style_item_says_what_it_takes(tmp_path, style, says):
    with pytest.raises(JobError) as info:
        resolve_files({"content": "c.png", "style": style}, tmp_path / "j.yaml", tmp_path)
    assert info.value.kind is ErrorKind.INVALID_JOB_FILE and says in info.value.message


def test_a_missing_mask_makes_the_job_wait(tmp_path):
    sidecar = masked_job(tmp_path)
    (tmp_path / "j-right.png").unlink()
    (tmp_path / "j-keep.png").unlink()
    job = parsed(sidecar)
    assert [p.name for p in job.files.missing] == ["j-right.png", "j-keep.png"]
    with pytest.raises(JobError) as info:
        check_job(job, load_config(None)["limits"])
    assert info.value.kind is ErrorKind.MISSING_INPUT and "not found: j-right.png, j-keep.png" in info.value.message


@pytest.mark.parametrize("where", ["style", "keep"])
def test_a_mask_that_is_a_link_is_refused_naming_its_key(tmp_path, where):
    inbox = tmp_path / "inbox"
    sidecar = masked_job(inbox)
    picture(tmp_path / "secret.png", MASK, mode="L")
    target = inbox / ("j-right.png" if where == "style" else "j-keep.png")
    target.unlink()
    target.symlink_to(tmp_path / "secret.png")
    with pytest.raises(JobError) as info:
        parsed(sidecar)
    assert info.value.kind is ErrorKind.PATH_OUTSIDE_INBOX
    assert info.value.message.startswith("style[1].mask: 'j-right.png'" if where == "style" else "keep: 'j-keep.png'")
    with pytest.raises(JobError, match=r"keep: '\.\./secret\.png' leads out of the inbox"):
        resolve_files({"content": "j-c.png", "keep": "../secret.png"}, sidecar, inbox)


# ------------------------------------------------------------------ the check: nstd validate


def test_a_mask_of_another_ratio_is_refused_by_validate_naming_its_key(tmp_path):
    sidecar = masked_job(tmp_path)
    half_mask(tmp_path / "j-right.png", SQUARE)
    picture(tmp_path / "j-keep.png", (201, 150), mode="L")  # 1.340 for 1.333: within 1 %
    v = check_one(sidecar, load_config(None))
    assert not v["ok"] and v["kind"] == "bad image"
    assert v["problems"] == ["style[1].mask: j-right.png is 32x32 (ratio 1.000) but the content is 64x48 (1.333); "
                             "a mask must have the content's aspect ratio (within 1%)"]
    picture(tmp_path / "j-keep.png", (66, 48), mode="L")  # 1.375: 3 % off
    problems = check_one(sidecar, load_config(None))["problems"]
    assert len(problems) == 2 and problems[1].startswith("keep: j-keep.png is 66x48 (ratio 1.375)")


def test_validate_shows_each_mask_and_the_keep_mask_with_sizes(tmp_path):
    v = check_one(masked_job(tmp_path), load_config(None))
    assert v["ok"], v
    text = "\n".join(v["_lines"])
    assert "style    j-s1.png (40x40), weight 0.333, mask j-left.png (32x24)" in text
    assert "style    j-s2.png (40x40), weight 0.667, mask j-right.png (32x24)" in text
    assert "keep     j-keep.png (32x24)" in text and "where no style's mask reaches" in text
    assert v["styles"][0]["mask"] == {"file": "j-left.png", "size": [32, 24]}
    assert v["keep"] == {"file": "j-keep.png", "size": [32, 24]}


# ------------------------------------------------------------------ claim, record, quarantine, retry


def folders_at(tmp_path) -> tuple[dict, Store]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"paths": {"root": str(tmp_path / "var")}}))
    cfg = load_config(config)
    f = Folders.from_config(cfg)
    f.create()
    return cfg, Store(f)


def claimed_job(tmp_path, sub="masks/"):
    cfg, store = folders_at(tmp_path)
    checked = check_job(parsed(masked_job(store.inbox, sub=sub)), cfg["limits"])
    return cfg, store, store.claim("j", checked.files, set(), checked.settings)


def test_a_claim_moves_the_masks_and_records_them(tmp_path):
    cfg, store, job = claimed_job(tmp_path)
    assert sorted(os.listdir(store.inbox)) == ["masks"] and os.listdir(store.inbox / "masks") == []
    assert sorted(os.listdir(job.inputs_dir)) == ["j-c.png", "j-keep.png", "j-left.png", "j-right.png", "j-s1.png",
                                                  "j-s2.png", "j.yaml"]
    again = Claim.from_folder(job.folder)
    assert again == job
    assert [(s.mask.file, s.mask.origin) for s in again.styles] == [("j-left.png", "masks/j-left.png"),
                                                                    ("j-right.png", "masks/j-right.png")]
    assert (again.keep.file, again.keep.origin) == ("j-keep.png", "j-keep.png")
    final = store.quarantine_claimed(job, {"kind": "cancelled"}, "")
    files = yaml.safe_load((final / "error.yaml").read_text())["files"]
    assert files["j-left.png"] == "masks/j-left.png" and files["j-keep.png"] == "j-keep.png"


def test_a_claim_json_from_before_masks_still_loads(tmp_path):
    _, _, job = claimed_job(tmp_path)
    record = json.loads(job.to_json())
    del record["keep"]
    for s in record["styles"]:
        del s["mask"]
    old = Claim.from_json(json.dumps(record), job.folder)
    assert old.keep is None and [s.mask for s in old.styles] == [None, None]
    assert [s.origin for s in old.styles] == ["j-s1.png", "j-s2.png"]


def test_a_retried_job_keeps_its_masks(tmp_path):
    cfg, store, job = claimed_job(tmp_path)
    store.quarantine_claimed(job, {"kind": "cancelled"}, "")
    done = retry(cfg, "j", {"steps": 3})
    assert sorted(done.moved.values()) == ["j-c.png", "j-keep.png", "j-left.png", "j-right.png", "j-s1.png", "j-s2.png"]
    new = yaml.safe_load((store.inbox / done.sidecar).read_text())
    assert [s.get("mask") for s in new["style"]] == ["j-left.png", "j-right.png"]  # back at the top of the inbox
    assert new["keep"] == "j-keep.png" and new["steps"] == 3
    again = parsed(store.inbox / done.sidecar).files
    assert again.missing == [] and [m.name for m in again.masks] == ["j-left.png", "j-right.png"]


def test_retry_refuses_a_mask_of_another_ratio_before_anything_moves(tmp_path):
    cfg, store, job = claimed_job(tmp_path, sub="")
    folder = store.quarantine_claimed(job, {"kind": "cancelled"}, "")
    half_mask(folder / "j-left.png", SQUARE)  # the operator put the wrong one there
    with pytest.raises(Exception, match=r"style\[0\].mask: j-left.png is 32x32"):
        retry(cfg, "j", {})
    assert os.listdir(store.inbox) == []


# ------------------------------------------------------------------ nstd stylize


def nstd(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "nstd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("masks, says", [
    (["m.png"], "--mask has 1 file(s) for 2 style image(s)"),
    (["m.png", "-", "m.png"], "--mask has 3 file(s) for 2 style image(s)"),
    (["sq.png", "-"], "--mask: sq.png is 32x32 (ratio 1.000) but the content is 64x48 (1.333)"),
    (["-", "m.png", "--keep", "sq.png"], "--keep: sq.png is 32x32"),
])
def test_stylize_refuses_masks_that_do_not_fit_in_one_line(tmp_path, masks, says):
    picture(tmp_path / "c.png", CONTENT)
    picture(tmp_path / "s.png", (40, 40), mode="noise")
    picture(tmp_path / "m.png", MASK, mode="L")
    picture(tmp_path / "sq.png", SQUARE, mode="L")
    r = nstd("stylize", tmp_path / "c.png", tmp_path / "s.png", tmp_path / "s.png", "--mask", *masks,
             "-o", tmp_path / "o.png", "--size", 32, "--steps", 1, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------- end to end (the engine honours the masks)


def test_stylize_with_masks_reports_the_regions(tmp_path):
    picture(tmp_path / "c.png", CONTENT, "blue")
    picture(tmp_path / "s.png", (40, 40), mode="noise")
    half_mask(tmp_path / "left.png")
    keep = Image.new("L", MASK, 0)
    keep.paste(255, (0, 0, 32, 6))  # the top quarter stays the content
    keep.save(tmp_path / "keep.png")
    out, report = tmp_path / "o.png", tmp_path / "report.json"
    r = nstd("stylize", tmp_path / "c.png", tmp_path / "s.png", "--mask", tmp_path / "left.png", "--keep",
             tmp_path / "keep.png", "-o", out, "--size", 32, "--steps", 2, "--device", "cpu", "-q", "--report", report)
    assert r.returncode == 0, r.stderr
    regions = json.loads(report.read_text())["regions"]
    assert set(regions) == {"styles", "keep", "no_style"}
    assert regions["keep"] == pytest.approx(0.25, abs=0.02)
    assert regions["styles"][0] == pytest.approx(0.375, abs=0.03)  # the left half, less its kept quarter
    assert regions["no_style"] == pytest.approx(0.375, abs=0.03)  # the right half, less its kept quarter
    # the kept part and the part no mask covers are the content's blue
    result = Image.open(out).convert("RGB")
    assert result.size == (32, 24)
    assert result.getpixel((28, 20)) == pytest.approx((0, 0, 255), abs=8)
    assert result.getpixel((4, 1)) == pytest.approx((0, 0, 255), abs=8)


def test_the_daemon_takes_masks_like_any_input(tmp_path):
    """One `nstd run --until-empty`: a masked job lands with its masks; a mask of another ratio, a
    mask that is a link and an unknown key each quarantine their job with the masks it can reach;
    a job whose mask is missing waits. The last one, retried with the key taken out, lands."""
    d = Daemon(tmp_path, watch={"missing_timeout": 600})
    inbox = d.inbox
    inbox.mkdir(parents=True)
    masked_job(inbox, "good", sub="masks/")
    masked_job(inbox, "ratio")
    half_mask(inbox / "ratio-left.png", SQUARE)
    masked_job(inbox, "link")
    picture(tmp_path / "secret.png", MASK, mode="L")
    (inbox / "link-keep.png").unlink()
    (inbox / "link-keep.png").symlink_to(tmp_path / "secret.png")
    masked_job(inbox, "typo", extra="sizee: 40\n")
    masked_job(inbox, "waits")
    (inbox / "waits-right.png").unlink()
    run = [sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(d.config)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    out = d.outbox / "good"
    assert sorted(os.listdir(out / "inputs")) == ["good-c.png", "good-keep.png", "good-left.png", "good-right.png",
                                                  "good-s1.png", "good-s2.png", "good.yaml"]
    effective = yaml.safe_load((out / "job.yaml").read_text())
    assert [s["mask"] for s in effective["style"]] == ["masks/good-left.png", "masks/good-right.png"]
    assert effective["keep"] == "good-keep.png"

    error = d.error("ratio")
    assert error["kind"] == "bad image" and error["message"].startswith("style[0].mask: ratio-left.png is 32x32")
    assert "ratio-left.png" in os.listdir(d.quarantine / "ratio")
    error = d.error("link")
    assert error["kind"] == "path outside inbox" and error["message"].startswith("keep: 'link-keep.png'")
    assert {"link-left.png", "link-right.png", "link-c.png"} <= set(os.listdir(d.quarantine / "link"))
    assert (inbox / "link-keep.png").is_symlink()  # a link is never moved
    assert d.error("typo")["kind"] == "invalid job file"
    assert {"typo-left.png", "typo-right.png", "typo-keep.png"} <= set(os.listdir(d.quarantine / "typo"))
    assert (inbox / "waits.yaml").exists() and (inbox / "waits-left.png").exists()

    assert nstd("retry", "typo", "sizee=", "--config", d.config).returncode == 0
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"typo-left.png", "typo-right.png", "typo-keep.png"} <= set(os.listdir(d.outbox / "typo" / "inputs"))
    assert yaml.safe_load((d.outbox / "typo" / "job.yaml").read_text())["keep"] == "typo-keep.png"


def test_report_json_has_the_regions(tmp_path, engine):
    """A worker with the real engine (the session's): report.json says what each mask covered."""
    from nstd.daemon.worker import Worker
    from nstd.daemon.queue import JobQueue
    from nstd.state.status import Status

    cfg, store, job = claimed_job(tmp_path, sub="")
    worker = Worker(cfg, "cpu", JobQueue(), store, Status(store.f.state), engine_factory=lambda **_: engine)
    worker.process(job)
    report = json.loads((store.outbox / "j" / "report.json").read_text())
    assert report["regions"] == {"styles": [pytest.approx(0.5, abs=0.02), pytest.approx(0.5, abs=0.02)],
                                 "keep": 0.0, "no_style": pytest.approx(0.0, abs=0.02)}
    picture(store.inbox / "p-c.png", CONTENT)
    picture(store.inbox / "p-s.png", (40, 40), mode="noise")
    (store.inbox / "p.yaml").write_text("content: p-c.png\nstyle: p-s.png\nsize: 32\nsteps: 2\ngif: false\n")
    checked = check_job(parsed(store.inbox / "p.yaml"), cfg["limits"])
    worker.process(store.claim("p", checked.files, set(), checked.settings))
    assert "regions" not in json.loads((store.outbox / "p" / "report.json").read_text())  # no masks, no key
