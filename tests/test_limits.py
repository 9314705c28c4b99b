"""A job's bounds (`limits:`): what a job may ask for, how long it may run, and what its GIF may
hold, whatever its dropper writes. The hardening issue's 'jobs without bounds' and 'cancel waits
for long passes'."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import yaml
from PIL import Image

from harness import Daemon
from nstd.config import ConfigError, load_config
from nstd.state import checkpoints
from nstd.job.check import over_limits
from nstd.job.spec import Job
from nstd.engine import Checkpoint, Engine, Interrupted, Progress
from nstd.engine import readbehind as stylize_mod
from nstd.engine.params import StyleParams
from test_operator import nstd


def limits(**over) -> dict:
    return {**load_config(None)["limits"], **over}


def settings(**over) -> Job:
    return Job.of({**load_config(None)["defaults"], **over})


def test_the_defaults_are_within_the_default_limits():
    assert over_limits(settings(), limits(), 1, (4000, 3000)) == []


@pytest.mark.parametrize("job, limit, message", [
    ({"steps": 100_000, "stages": 1}, {}, "steps: 100,000 in all (1 stage(s)), over limits.max_steps=5,000"),
    # 12 stages of 4000 steps each is the issue's job: both its steps and its stages are named
    ({"size": 8192, "steps": 4000, "stages": 12, "stage_steps": 1.0}, {"max_steps": 10**7},
     ", over limits.max_stages=8"),
    ({"priority": 1_000_000}, {}, "priority: 1000000, outside limits.min_priority..max_priority (-100..100)"),
    ({"priority": -101}, {}, "outside limits.min_priority..max_priority"),
    ({"size": 8192}, {"max_job_pixels": 4096 * 4096}, "size: 8192 makes a 8192x6144 result (50,331,648 pixels), "
                                                       "over limits.max_job_pixels=16,777,216"),
])
def test_each_static_limit_is_named(job, limit, message):
    over = over_limits(settings(**job), limits(**limit), 1, (4000, 3000))
    assert any(message in o for o in over), over


def test_styles_over_the_limit_are_named():
    assert over_limits(settings(), limits(max_styles=2), 3) == ["style: 3 styles, over limits.max_styles=2"]


def test_a_config_whose_defaults_break_its_own_limits_is_refused(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("defaults: {steps: 300}\nlimits: {max_steps: 100}\n")
    with pytest.raises(ConfigError, match="defaults: every job would be refused: steps: 300 in all"):
        load_config(cfg)
    cfg.write_text("limits: {min_priority: 5, max_priority: 1}\n")
    with pytest.raises(ConfigError, match="min_priority .5. is above"):
        load_config(cfg)


def test_validate_and_the_daemon_refuse_a_job_over_the_limits(tmp_path, images_dir):
    d = Daemon(tmp_path, limits={"max_styles": 1})
    d.start()
    try:
        shutil.copy(images_dir / "starry_night.jpg", d.inbox / "starry_night.jpg")
        job = {"content": "hoovertowernight.jpg", "style": ["starry_night.jpg", "the_scream.jpg"],
               "priority": 1_000_000, "steps": 99_999}
        d.drop("greedy", job, style="the_scream.jpg")
        r = nstd("validate", d.inbox / "greedy.yaml", "--config", d.config)
        assert r.returncode == 2 and "greedy.yaml: over limit" in r.stdout, r.stdout
        for named in ("limits.max_steps=5,000", "limits.max_styles=1", "limits.min_priority..max_priority"):
            assert named in r.stdout
        d.wait_quarantined("greedy", timeout=30)
        error = d.error("greedy")
        assert error["kind"] == "over limit" and "limits.max_steps" in error["message"]
        assert d.alive()
    finally:
        d.stop()


def test_a_job_over_its_time_stops_is_quarantined_and_a_retry_goes_on_from_its_checkpoint(tmp_path):
    """max_job_seconds: the job stops at a step and is quarantined as over limit; its checkpoint
    is kept in state/kept; retried under a larger limit it resumes from that step."""
    d = Daemon(tmp_path, defaults={"size": 48, "steps": 400, "gif": {"every": 20}},
               limits={"max_job_seconds": 1.5})
    d.start()
    try:
        d.drop("slow", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_quarantined("slow", timeout=120)
        error = d.error("slow")
        assert error["kind"] == "over limit" and "limits.max_job_seconds=1.5" in error["message"], error
        assert "its checkpoint is kept" in error["message"]
        stopped_at = int(error["message"].split("stopped at step ")[1].split()[0])
        assert 0 < stopped_at < 400
        assert len(list((d.state / "kept").iterdir())) == 1
    finally:
        d.stop()
    d.config.write_text(d.config.read_text().replace("max_job_seconds: 1.5", "max_job_seconds: 0"))
    d.start()
    try:
        r = nstd("retry", "slow", "--config", d.config)
        assert r.returncode == 0, r.stderr
        d.wait_landed("slow", timeout=240)
        report = json.loads((d.outbox / "slow" / "report.json").read_text())
        assert report["resumed_from_step"] == stopped_at and report["steps_run"] == 400 - stopped_at
        assert list((d.state / "kept").iterdir()) == []  # adopted: it is the job's, and went with it
        assert "its checkpoint was kept" in (d.outbox / "slow" / "job.log").read_text()
    finally:
        d.stop()


def test_a_kept_checkpoint_is_found_only_by_the_same_inputs_and_keys():
    a = checkpoints.job_key(settings().settings, ["content 1", "style 1.0 2"])
    assert a == checkpoints.job_key(settings(priority=5).settings, ["content 1", "style 1.0 2"])  # priority shapes nothing
    assert a != checkpoints.job_key(settings().settings, ["content 1", "style 1.0 3"])
    assert a != checkpoints.job_key(settings(style_weight=1.0).settings, ["content 1", "style 1.0 2"])


class _StopAt(Progress):
    def __init__(self, stop_after: float = 0.0):
        self.t0, self.stop_after, self.steps, self.ticks = time.monotonic(), stop_after, 0, 0

    def on_step(self, info) -> None:
        self.steps += 1

    def alive(self) -> None:
        self.ticks += 1

    def should_stop(self) -> bool:
        return time.monotonic() - self.t0 >= self.stop_after


def _pictures():
    g = torch.Generator().manual_seed(0)
    img = lambda w, h: Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())  # noqa: E731
    return img(64, 48), img(48, 64)


def test_a_stop_asked_during_the_style_targets_is_taken_there(engine):
    """A big style read in tiles (style_scale above 1): the target passes check the stop at
    every tile, so a cancel or SIGTERM is not left waiting for them (the issue: 21 s)."""
    content, style = _pictures()
    progress = _StopAt(0.0)
    with pytest.raises(Interrupted) as info:
        engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=5, stages=1, style_scale=2.0,
                                                                   frame_every=0), progress=progress)
    assert info.value.checkpoint.step == 0 and info.value.checkpoint.image is None
    assert progress.steps == 0 and progress.ticks >= 1


def test_an_untiled_style_pass_takes_a_stop_between_its_layers(engine):
    """A style pass with memory to spare is not tiled, and over a 3072 px style it took 19 s on
    this CPU without a look at the stop (the hostile replay: a job over its time stopped 19 s
    late). Each layer now ticks: asked after the first ticks, the stop is taken inside the pass."""
    _, style = _pictures()

    class Count(Progress):
        ticks = 0

        def alive(self):
            self.ticks += 1

        def should_stop(self):
            return self.ticks >= 3

    progress = Count()
    content = Image.new("RGB", (64, 48), (90, 120, 200))
    with pytest.raises(Interrupted):
        engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=5, stages=1, frame_every=0),
                       progress=progress)
    assert progress.ticks == 3  # the third layer's tick, not the pass's end (30 layers)
    p = StyleParams()
    layers = []
    engine.style_grams(style, 64, p.style_layers, p.pooling, tick=lambda: layers.append(1))
    assert len(layers) >= 20  # conv1_1 .. conv5_1 with their ReLUs and pools


def test_gif_frames_stay_bounded_whatever_the_job_asks(engine, monkeypatch, tmp_path):
    """A frame every step for many steps: frames are thinned (every other goes, then half as many
    are taken), the first and the last stay, and a checkpoint after thinning resumes right."""
    monkeypatch.setattr(stylize_mod, "FRAMES_MAX", 8)
    monkeypatch.setattr(stylize_mod, "FRAMES_MIN", 8)
    content, style = _pictures()
    p = StyleParams(size=48, steps=40, stages=1, frame_every=1, grain=0.0)
    result = engine.stylize(content, [(style, 1.0)], p)
    assert 4 <= len(result.frames) <= 9
    assert stylize_mod._frame_size((10000, 5000), 4096) == (1024, 512)
    # stop at a step, save, load: the thinned frames and their stride come back
    seen: list[Checkpoint] = []

    class Stop(Progress):
        def on_checkpoint(self, cp):
            seen.append(cp)

        def checkpoint_due(self, step):
            return step == 30

        def should_stop(self):
            return bool(seen)

    with pytest.raises(Interrupted) as info:
        engine.stylize(content, [(style, 1.0)], p, progress=Stop())
    cp = info.value.checkpoint
    assert cp.frame_stride > 1 and len(cp.frames) <= 9
    checkpoints.save(tmp_path / "cp", cp)
    back = checkpoints.load(tmp_path / "cp")
    assert back.frame_stride == cp.frame_stride and len(back.frames) == len(cp.frames)
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["checkpoint.pt", f"frames-x{cp.frame_stride}"]
    resumed = engine.stylize(content, [(style, 1.0)], p, resume=back)
    assert 4 <= len(resumed.frames) <= 9


def test_a_size_lowered_to_fit_memory_below_what_the_network_takes_is_refused_not_crashed(tmp_path):
    """A 1600x32 panorama at size 1600 under limits.cpu_memory_mb: 64: validate passes it (the
    budget is the device's), the worker lowers the size to fit, and there the picture is too thin
    for the network. Before: an internal error (a ValueError inside the engine); now 'out of memory'
    with both reasons."""
    d = Daemon(tmp_path, limits={"cpu_memory_mb": 64})
    Image.effect_noise((1600, 32), 60).convert("RGB").save(tmp_path / "pano.png")
    d.start()
    try:
        d.image("starry_night.jpg")
        shutil.copy(tmp_path / "pano.png", d.inbox / "pano.png")
        d.drop("pano", {"content": "pano.png", "style": "starry_night.jpg", "size": 1600, "stages": 1,
                        "anchor_size": 0, "gif": False}, images=False)
        d.wait_quarantined("pano", timeout=60)
        error = d.error("pano")
        assert error["kind"] == "out of memory" and error["stage"] == "run", error
        assert "does not fit limits.cpu_memory_mb=64" in error["message"] and "the content (1600x32) at" in error["message"]
        assert "conv5_1 needs" in error["message"]
    finally:
        d.stop()
