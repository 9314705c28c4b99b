"""Regions attacked as a careless or hostile user would: odd mask values and files, borders of the
1 % ratio rule, a mask naming another job's file, a mask that changes after the claim. Each
defect found here is named in its test's docstring as it was before the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import Daemon
from nstd.commands.validate import check_one
from nstd.config import load_config
from nstd.engine import StyleImage, regions
from nstd.engine.images import open_image
from nstd.job.check import check_job
from test_regions_jobs import CONTENT, MASK, folders_at, half_mask, parsed, picture


def base(folder: Path) -> None:
    picture(folder / "c.png", CONTENT, mode="noise")
    picture(folder / "s.png", (40, 40), mode="noise")
    picture(folder / "m.png", MASK, "white", mode="L")


def verdict(folder: Path, body: str) -> dict:
    (folder / "j.yaml").write_text("content: c.png\nsize: 32\nsteps: 2\ngif: false\n" + body)
    return check_one(folder / "j.yaml", load_config(None))


# ------------------------------------------------------------------ defended: refused naming the key


@pytest.mark.parametrize("body, kind, says", [
    ("style: [{path: s.png, mask: null}]\n", "invalid job file", "style[0].mask: expected a file name, got None"),
    ("style: [{path: s.png, mask: 5}]\n", "invalid job file", "style[0].mask: expected a file name, got 5"),
    ("style: [{path: s.png, mask: [m.png, m.png]}]\n", "invalid job file", "style[0].mask: expected a file name"),
    ("style: s.png\nkeep: {}\n", "invalid job file", "keep: expected a file name, got {}"),
    ("style: [{path: s.png, mask: ../m.png}]\n", "path outside inbox", "style[0].mask: '../m.png' leads out"),
    ("style: [{path: s.png, mask: /etc/hostname}]\n", "path outside inbox", "style[0].mask: '/etc/hostname' is an absolute"),
    ("style: {path: s.png, mask: m.png}\n", "invalid job file", "[{path: a.jpg, mask: sky.png}]"),
    ("style: [{path: s.png, mask: j.yaml}]\n", "invalid job file", "style[0].mask: 'j.yaml' is a job file"),
    ("style: [{path: s.png, mask: j.waiting.txt}]\n", "invalid job file", "is a job file or nstd's note"),
    ("content: j.YML\nstyle: s.png\n", "invalid job file", "content: 'j.YML' is a job file"),
])
def test_odd_mask_values_are_refused_clearly(tmp_path, body, kind, says):
    base(tmp_path)
    v = verdict(tmp_path, body)
    assert not v["ok"] and v["kind"] == kind and says in v["problems"][0], v


@pytest.mark.parametrize("make, kind", [
    (lambda p: (p.unlink(), p.mkdir()), "invalid job file"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "invalid job file"),
    (lambda p: p.write_bytes(b""), "bad image"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "bad image"),
    (lambda p: (p.unlink(), os.link(p.parent.parent / "outside.png", p)), "path outside inbox"),
    (lambda p: (p.unlink(), p.symlink_to(p.parent.parent / "outside.png")), "path outside inbox"),
    (lambda p: Image.new("1", (20000, 15000), 0).save(p, optimize=True), "bad image"),  # > max_pixels
])
def test_a_mask_that_is_no_plain_image_is_refused(tmp_path, make, kind):
    inbox = tmp_path / "inbox"
    base(inbox)
    picture(tmp_path / "outside.png", MASK, mode="L")
    make(inbox / "m.png")
    v = verdict(inbox, "style: [{path: s.png, mask: m.png}]\n")
    assert not v["ok"] and v["kind"] == kind, v
    assert (tmp_path / "outside.png").exists()


@pytest.mark.parametrize("save, cover", [
    (lambda p: Image.fromarray(np.full(MASK[::-1], 32768, np.uint16)).save(p), 0.5),  # 16-bit grey
    (lambda p: Image.new("LA", MASK, (0, 0)).save(p), 1.0),  # transparent counts as white
    (lambda p: Image.new("RGBA", MASK, (0, 0, 0, 128)).save(p), 0.5),
    (lambda p: Image.new("CMYK", MASK, (0, 0, 0, 255)).save(p.with_suffix(".jpg")), 0.0),
])
def test_mask_formats_read_as_their_grey(tmp_path, save, cover):
    path = tmp_path / "m.png"
    save(path)
    path = path if path.exists() else path.with_suffix(".jpg")
    t = regions.mask_tensor(open_image(path), (32, 24), torch.device("cpu"))
    assert float(t.mean()) == pytest.approx(cover, abs=0.01)


def test_a_mask_of_another_ratio_is_refused_and_1_percent_less_is_taken(tmp_path):
    base(tmp_path)
    picture(tmp_path / "m.png", (1347, 1000), mode="L")  # 1.347 for 1.333: over 1 %
    assert verdict(tmp_path, "style: [{path: s.png, mask: m.png}]\n")["kind"] == "bad image"
    picture(tmp_path / "m.png", (1346, 1000), mode="L")
    assert verdict(tmp_path, "style: [{path: s.png, mask: m.png}]\n")["ok"]


# ------------------------------------------------------------------ defects


@pytest.mark.parametrize("content, mask", [((100, 100), (101, 100)), ((64, 48), (101, 75)), ((200, 100), (202, 100))])
def test_a_mask_exactly_1_percent_off_is_within_1_percent(tmp_path, content, mask):
    """docs/jobs.md: 'A mask must have the content's aspect ratio (within 1 %)'. A mask exactly
    1 % off was refused by a float rounding (1.0100000000000002 > 1.01)."""
    base(tmp_path)
    picture(tmp_path / "c.png", content, mode="noise")
    picture(tmp_path / "m.png", mask, mode="L")
    v = verdict(tmp_path, "style: [{path: s.png, mask: m.png}]\n")
    assert v["ok"], v["problems"]


def test_a_float_tiff_mask_of_all_white_covers_everything(tmp_path):
    """A 32-bit float TIFF mask of 1.0 everywhere (white, the style everywhere) was read as all
    black (the float reader stretched min..max, and a flat picture has no span): the style
    goes nowhere, and a `keep` of it keeps nothing."""
    Image.fromarray(np.ones(MASK[::-1], np.float32)).save(tmp_path / "m.tif")
    Image.fromarray(np.full(MASK[::-1], 0.5, np.float32)).save(tmp_path / "half.tif")
    content = Image.new("RGB", CONTENT)
    white, half = open_image(tmp_path / "m.tif"), open_image(tmp_path / "half.tif")
    lay = regions.layout([StyleImage(content, 1.0, mask=white)], None, CONTENT, (32, 24), torch.device("cpu"))
    assert lay.report["styles"] == [1.0] and lay.report["no_style"] == 0.0
    lay = regions.layout([StyleImage(content, 1.0)], white, CONTENT, (32, 24), torch.device("cpu"))
    assert lay.report["keep"] == 1.0
    lay = regions.layout([StyleImage(content, 1.0, mask=half)], None, CONTENT, (32, 24), torch.device("cpu"))
    assert lay.report["styles"] == [pytest.approx(0.5, abs=0.01)]


def worker_for(cfg, store, engine):
    from nstd.daemon.queue import JobQueue
    from nstd.daemon.worker import Worker
    from nstd.state.status import Status

    return Worker(cfg, "cpu", JobQueue(), store, Status(store.f.state), engine_factory=lambda **_: engine)


def test_a_masked_style_of_weight_0_is_refused_up_front_or_runs(tmp_path, engine):
    """`style: [{path: s.png, weight: 0, mask: m.png}, t.png]`: validate said ok, and the daemon
    quarantined it as an *internal error* (ValueError: style blend weights must be >= 0 and not
    all 0: the masked style is alone in its region). `nstd stylize --style-blend 0 1 --mask m.png -`
    exited 2 with that same misleading line. Now a style of weight 0 paints nowhere."""
    cfg, store = folders_at(tmp_path)
    inbox = store.inbox
    base(inbox)
    picture(inbox / "t.png", (40, 40), mode="noise")
    v = verdict(inbox, "style: [{path: s.png, weight: 0, mask: m.png}, t.png]\n")
    if not v["ok"]:  # refused up front, naming the weight: fine
        assert "style[0]" in " ".join(v["problems"])
        return
    checked = check_job(parsed(inbox / "j.yaml"), cfg["limits"])
    worker_for(cfg, store, engine).process(store.claim("j", checked.files, set(), checked.settings))
    quarantined = store.f.quarantine / "j" / "error.yaml"
    assert not quarantined.exists(), quarantined.read_text()
    assert (store.outbox / "j" / "report.json").exists()


def test_a_mask_changed_after_the_claim_is_input_changed_not_an_internal_error(tmp_path, engine):
    """A dropper still holding the mask open rewrites it after the claim with another ratio: the
    worker's layout raised ValueError, and the job was quarantined as an internal error (a bug, a
    traceback in the log) instead of `input changed` like any other input that changed."""
    cfg, store = folders_at(tmp_path)
    inbox = store.inbox
    base(inbox)
    v = verdict(inbox, "style: [{path: s.png, mask: m.png}]\n")
    assert v["ok"], v
    checked = check_job(parsed(inbox / "j.yaml"), cfg["limits"])
    job = store.claim("j", checked.files, set(), checked.settings)
    half_mask(job.path(job.styles[0].mask), (32, 32))  # now square
    worker_for(cfg, store, engine).process(job)
    error = (store.f.quarantine / "j" / "error.yaml").read_text()
    assert "internal error" not in error and "input changed" in error, error


def test_a_mask_naming_another_jobs_job_file_leaves_that_job_alone(tmp_path):
    """User A's `mask: b.yaml` (user B's job file, B still waiting for an input) was refused as a
    bad image, and B's job file went into A's quarantine folder: B's job gone from the inbox, its
    content left behind unexplained (`content: b.yaml` did the same). An input is never a job file."""
    d = Daemon(tmp_path, watch={"missing_timeout": 600})
    inbox = d.inbox
    picture(inbox / "b-c.png", CONTENT, mode="noise")
    (inbox / "b.yaml").write_text("content: b-c.png\nstyle: b-s.png\nsize: 32\nsteps: 2\n")  # b-s.png still to come
    picture(inbox / "a-c.png", CONTENT, mode="noise")
    picture(inbox / "a-s.png", (40, 40), mode="noise")
    (inbox / "a.yaml").write_text("content: a-c.png\nstyle: [{path: a-s.png, mask: b.yaml}]\nsize: 32\nsteps: 2\n")
    r = subprocess.run([sys.executable, "-m", "nstd.cli", "run", "--until-empty", "--config", str(d.config)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert d.error("a")["kind"] == "invalid job file" and "is a job file" in d.error("a")["message"]
    assert "b.yaml" not in os.listdir(d.quarantine / "a")
    assert (inbox / "b.yaml").exists()


# ------------------------------------------------------------------ defended: degenerate masks run


def test_all_black_masks_and_a_white_keep_finish_as_the_content(tmp_path):
    picture(tmp_path / "c.png", CONTENT, mode="noise")
    picture(tmp_path / "s.png", (40, 40), mode="noise")
    picture(tmp_path / "black.png", MASK, "black", mode="L")
    picture(tmp_path / "white.png", MASK, "white", mode="L")
    for opts, want in ((["--mask", "black.png"], {"styles": [0.0], "keep": 0.0, "no_style": 1.0}),
                       (["--keep", "white.png"], {"styles": [0.0], "keep": 1.0, "no_style": 0.0})):
        r = subprocess.run([sys.executable, "-m", "nstd.cli", "stylize", "c.png", "s.png", *opts, "-o", "o.png",
                            "--size", "32", "--steps", "2", "--device", "cpu", "-q", "--report", "r.json"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=240)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "r.json").read_text())["regions"] == want
        content = Image.open(tmp_path / "c.png").convert("RGB").resize((32, 24), Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(content, int) - np.asarray(Image.open(tmp_path / "o.png").convert("RGB"), int)).max() <= 1


@pytest.mark.parametrize("written", [["-o", "m.png"], ["-o", "./sub/../c.png"], ["-o", "o.png", "--report", "s.png"],
                                     ["-o", "o.png", "--gif", "link.gif"]])
def test_stylize_never_writes_over_one_of_its_inputs(tmp_path, written):
    """`nstd stylize c.png s.png --mask m.png -o m.png` wrote the result over the user's mask (and
    `-o c.png` over the content): refused now, exit 2, every input as it was."""
    picture(tmp_path / "c.png", CONTENT, mode="noise")
    picture(tmp_path / "s.png", (40, 40), mode="noise")
    picture(tmp_path / "m.png", MASK, "white", mode="L")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.gif").symlink_to(tmp_path / "m.png")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    r = subprocess.run([sys.executable, "-m", "nstd.cli", "stylize", "c.png", "s.png", "--mask", "m.png", *written,
                        "--size", "32", "--steps", "2", "--device", "cpu", "-q"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert r.returncode == 2 and "that is one of the inputs" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == before


def test_validate_warns_of_a_mask_with_transparency(tmp_path):
    """A cut-out drawn only in the alpha channel reads as all white (transparent counts as white,
    like every input): nstd validate says so beside the mask."""
    base(tmp_path)
    Image.new("RGBA", MASK, (0, 0, 0, 0)).save(tmp_path / "cut.png")
    v = verdict(tmp_path, "style: [{path: s.png, mask: cut.png}]\nkeep: cut.png\n")
    assert v["ok"] and sum("transparent parts count as white" in line for line in v["_lines"]) == 2, v["_lines"]
    v = verdict(tmp_path, "style: [{path: s.png, mask: m.png}]\n")
    assert not any("transparen" in line for line in v["_lines"]), v["_lines"]
