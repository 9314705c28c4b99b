"""`nstd stylize` as a user runs it: a process, exit codes, one-line errors."""
import subprocess
import sys

import pytest
from PIL import Image


def nstd(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "nstd.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=240
    )


def test_stylize_writes_result_and_gif(images_dir, tmp_path):
    out, gif = tmp_path / "out" / "r.png", tmp_path / "r.gif"
    r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", out,
             "--size", 48, "--steps", 4, "--gif", gif, "--gif-every", 2, "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "48x36" in r.stdout
    assert Image.open(out).size == (48, 36)
    assert Image.open(gif).n_frames == 3
    assert [p.name for p in out.parent.iterdir()] == ["r.png"]  # no temporary file left behind


def test_blend_of_two_styles_to_jpeg(images_dir, tmp_path):
    out = tmp_path / "r.jpg"
    r = nstd("stylize", images_dir / "hoovertowernight.jpg", images_dir / "starry_night.jpg",
             images_dir / "the_scream.jpg", "--style-blend", 0.7, 0.3, "-o", out, "--size", 40, "--steps", 2, "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).format == "JPEG"


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--size", "5"], 2, "--size: expected an integer from 32 to 8192, got 5"),
        (["--optimizer", "sgd"], 2, "--optimizer: expected one of lbfgs, adam"),
        (["--style-blend", "1", "2"], 2, "--style-blend has 2 weights for 1 style images"),
        (["--weights", "torchvision", "--weights-file", "/nonexistent.pth"], 3, "weights file not found"),
        (["--device", "tpu"], 2, "--device: expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_arguments_fail_in_one_line(images_dir, tmp_path, extra, code, message):
    r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", tmp_path / "o.png",
             "--steps", 1, "--size", 32, *extra)
    assert r.returncode == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_bad_image_and_output_name(images_dir, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(b"")
    r = nstd("stylize", tmp_path / "cat.jpg", images_dir / "starry_night.jpg", "-o", tmp_path / "o.png")
    assert r.returncode == 2 and "cat.jpg: the file is empty" in r.stderr and "Traceback" not in r.stderr
    r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", tmp_path / "o.txt")
    assert r.returncode == 2 and "cannot tell the output format" in r.stderr


def test_validate_a_good_and_a_bad_job(images_dir, tmp_path):
    import shutil

    shutil.copy(images_dir / "tubingen.jpg", tmp_path / "t.jpg")
    shutil.copy(images_dir / "starry_night.jpg", tmp_path / "s.jpg")
    (tmp_path / "ok.yaml").write_text("content: t.jpg\nstyle: s.jpg\nsteps: 50\n")
    r = nstd("validate", tmp_path / "ok.yaml")
    assert r.returncode == 0, r.stderr
    assert "ok.yaml: ok" in r.stdout and "t.jpg (1024x768)" in r.stdout and "steps 50" in r.stdout
    (tmp_path / "bad.yaml").write_text("content: t.jpg\nstyle: ../s.jpg\n")
    r = nstd("validate", tmp_path / "bad.yaml")
    assert r.returncode == 2 and "path outside inbox" in r.stdout and "Traceback" not in r.stderr
    (tmp_path / "gone.yaml").write_text("content: t.jpg\nstyle: nope.jpg\n")
    r = nstd("validate", tmp_path / "gone.yaml")
    assert r.returncode == 2 and "missing input" in r.stdout and "nope.jpg" in r.stdout


@pytest.mark.parametrize("content_size, keys, says", [
    ((60000, 1), "size: 64\n", "the content (60000x1) at 64 px would be 64x1 px"),
    ((1, 60000), "size: 64\n", "the content (1x60000) at 64 px would be 1x64 px"),
    ((640, 480), "size: 64\nstyle_scale: 0.1\n", "the style (640x400) read at 16 px"),
    ((640, 480), "size: 64\nstages: 2\nanchor_size: 1\n", "the style anchor (anchor_size 1)"),
])
def test_validate_refuses_what_the_network_cannot_take_and_the_engine_agrees(tmp_path, content_size, keys, says):
    """Every pass of the run (each stage's content, each style at its scale, the anchor) is checked
    against the deepest layer's smallest picture, once, by validate and the engine alike: what
    validate passes runs, what it refuses is refused with the same reason instead of a crash."""
    Image.new("RGB", content_size, (90, 120, 200)).save(tmp_path / "c.png")
    Image.effect_noise((640, 400), 60).convert("RGB").save(tmp_path / "s.png")
    (tmp_path / "j.yaml").write_text("content: c.png\nstyle: s.png\nsteps: 1\n" + keys)
    r = nstd("validate", tmp_path / "j.yaml")
    assert r.returncode == 2 and "bad image" in r.stdout and says in r.stdout, r.stdout
    args = ["--size", 64, "--steps", 1, "-q", "--device", "cpu"]
    args += ["--style-scale", 0.1] if "style_scale" in keys else []
    args += ["--stages", 2, "--anchor-size", 1] if "anchor_size" in keys else []
    r = nstd("stylize", tmp_path / "c.png", tmp_path / "s.png", "-o", tmp_path / "o.png", *args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_status_says_when_no_daemon_runs(tmp_path):
    (tmp_path / "config.yaml").write_text("paths: {root: ./var}\n")
    r = nstd("status", "--config", tmp_path / "config.yaml")
    assert r.returncode == 1 and "no daemon is running" in r.stdout
    r = nstd("status", "--json", "--config", tmp_path / "config.yaml")
    assert '"daemon_running": false' in r.stdout


def test_without_a_terminal_stylize_says_each_stage_and_its_progress_and_writes_a_report(images_dir, tmp_path):
    """stderr to a file (as `2> log`, cron): a tqdm bar turns itself off, and a 1024 px run said
    nothing for 13 minutes. Now a line as each stage starts and ends (its time and peak memory)
    and one at least every --progress-every seconds; --report writes the daemon's report keys."""
    import json

    out, report = tmp_path / "r.png", tmp_path / "report.json"
    r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", out, "--size", 64,
             "--stages", "32:12,64:8", "--device", "cpu", "--progress-every", "0.01", "--report", report)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "nstd: stage 1/2: 32 px, 12 steps, started", lines
    done = [x for x in lines if " done, " in x]
    assert len(done) == 2 and "stage 2/2: 64 px done, 8 steps in" in done[1] and "peak RSS" in done[1], lines
    assert any(x.startswith("nstd: step ") and "/20 (stage " in x and "loss" in x for x in lines), lines
    made = json.loads(report.read_text())
    assert made["steps"] == 12 and made["steps_total"] == 20 and [s["steps_run"] for s in made["stages"]] == [12, 8]
    assert made["size_used"] == [64, 48] and made["e512"] > 0 and made["versions"]["nstd"]
    quiet = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", out, "--size", 32,
                 "--steps", 2, "--device", "cpu", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_each_style_loss_runs_and_sliced_over_the_budget_is_refused_in_one_line(images_dir, tmp_path):
    """--style-loss w2 and sliced run; sliced cannot run in tiles, so a size whose untiled pass is
    over the budget is refused with why and what can run it, not shrunk in silence."""
    import json

    for loss in ("w2", "sliced"):
        report = tmp_path / f"{loss}.json"
        r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", tmp_path / f"{loss}.png",
                 "--size", 40, "--steps", 3, "--style-loss", loss, "-q", "--report", report)
        assert r.returncode == 0, r.stderr
        assert json.loads(report.read_text())["steps_total"] == 3
    r = nstd("stylize", images_dir / "tubingen.jpg", images_dir / "starry_night.jpg", "-o", tmp_path / "big.png",
             "--size", 2048, "--stages", 1, "--steps", 1, "--style-loss", "sliced", "--budget-mb", 64, "-q")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sliced cannot run in tiles" in r.stderr and "gram or w2" in r.stderr
