"""Big prints: the coarse-to-fine schedule, activation checkpointing, the tiled VGG pass and the
memory fit that picks among them before it ever shrinks a picture."""
import pytest
import torch
from PIL import Image

from nstd.engine import StyleImage, StyleParams
from nstd.engine.losses import Objective, gram
from nstd.engine.memory import Techniques, choose, fit_size, predict_peak_bytes
from nstd.engine.progress import Interrupted, Progress
from nstd.engine.schedule import MIN_STAGE_STEPS, Stage, plan, stage_at
from nstd.engine.tiles import Tiler, halo_for, layout
from nstd.job.keys import JOB_FIELDS, merge
from nstd.job.spec import Job
from nstd.schema import SchemaError, defaults

DEFAULT = ["conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]
GIB = 2**30


# ----------------------------------------------------------------------------- the schedule


def test_auto_schedule_starts_near_256_and_doubles_with_half_the_steps():
    assert plan(2048, 300) == [Stage(256, 300), Stage(512, 150), Stage(1024, 75), Stage(2048, 38)]
    assert plan(1024, 300) == [Stage(256, 300), Stage(512, 150), Stage(1024, 75)]
    assert [s.size for s in plan(4096, 300)] == [256, 512, 1024, 2048, 4096]
    assert plan(4096, 300)[-1].steps == MIN_STAGE_STEPS  # never fewer
    assert [s.size for s in plan(3000, 300)] == [188, 375, 750, 1500, 3000]  # ends at the size asked
    assert plan(512, 300) == [Stage(512, 300)] and plan(768, 300) == [Stage(768, 300)]  # the classic run
    assert plan(64, 10) == [Stage(64, 10)]
    assert plan(2048, 300, stages=1) == [Stage(2048, 300)]
    assert plan(512, 300, stages=2) == [Stage(256, 300), Stage(512, 150)]
    assert plan(1024, 10, stages=3) == [Stage(256, 10), Stage(512, 10), Stage(1024, 10)]  # steps < the floor
    assert [s.size for s in plan(1024, 100, stages=3, factor=1.5)] == [455, 683, 1024]
    assert len(plan(8192, 300, start=32, factor=1.1)) == 12  # auto never makes more stages than a list may have
    with pytest.raises(ValueError):
        plan(512, 300, stages=0)


def test_stages_too_thin_for_the_network_are_left_out(engine, pair):
    """A 20:1 panorama: its 160 px stage would be 8 px high, under conv5_1's 16; the run goes on
    without it instead of failing."""
    _, style = pair
    panorama = Image.new("RGB", (640, 32), (90, 120, 160))
    p = StyleParams(size=640, steps=2, stages=(Stage(160, 2), Stage(640, 2)), frame_every=0)
    assert engine.plan(panorama, [StyleImage(style)], p) == [Stage(640, 2)]
    result = engine.stylize(panorama, [(style, 1.0)], p)
    assert result.size == (640, 32) and [s["size"] for s in result.stages] == [[640, 32]]
    # a small style_scale makes the style the thin one
    q = StyleParams(size=256, steps=2, stages=(Stage(64, 2), Stage(256, 2)), style_scale=0.1)
    assert engine.plan(Image.new("RGB", (256, 192)), [StyleImage(Image.new("RGB", (200, 160)))], q) == [Stage(256, 2)]
    # and where even the last stage's style would be too thin, the run is refused with the reason
    with pytest.raises(ValueError, match=r"the style \(200x100\) read at 26 px for the 256 px stage would be 26x13"):
        engine.plan(Image.new("RGB", (256, 192)), [StyleImage(Image.new("RGB", (200, 100)))], q)


def test_the_total_steps_are_those_of_the_stages_that_run(engine, pair):
    """A stage the plan leaves out (too thin for the network) is not counted: the total the job
    is planned with, the one progress reports at every step and the result's are the steps run
    (the issue's "progress can say 4 steps when 2 run")."""
    _, style = pair
    panorama = Image.new("RGB", (640, 32), (90, 120, 160))
    p = StyleParams(size=640, steps=2, stages=(Stage(160, 2), Stage(640, 2)), frame_every=0)
    seen = []
    result = engine.stylize(panorama, [(style, 1.0)], p, progress=lambda i: seen.append((i.step, i.steps)))
    ran = len(seen)
    assert ran == 2 and [s for s, _ in seen] == [1, 2] and {n for _, n in seen} == {ran}
    assert result.steps == ran and p.total_steps(panorama.size, [style.size]) == ran
    assert sum(st.steps for st in p.schedule()) == 4  # what was asked, before the plan


def test_a_checkpoint_resumes_in_its_stage():
    stages = [Stage(64, 10), Stage(128, 5)]
    assert stage_at(stages, 1) == (0, 0) and stage_at(stages, 10) == (0, 0)
    assert stage_at(stages, 11) == (1, 10) and stage_at(stages, 15) == (1, 10)


def test_job_keys_for_stages():
    base = defaults(JOB_FIELDS)
    job = merge(base, {"stages": [{"size": 256, "steps": 100}, {"size": 768, "steps": 40}]})
    assert job["size"] == 768 and job["steps"] == 100  # job.yaml says what runs
    p = Job.of(job).params()
    assert p.schedule() == [Stage(256, 100), Stage(768, 40)] and p.total_steps((1024, 768), [(512, 512)]) == 140
    assert merge(base, {"stages": [{"size": 256, "steps": 100}], "size": 256, "steps": 100})["size"] == 256
    assert Job.of(merge(base, {"stages": 1, "size": 2048})).params().schedule() == [Stage(2048, 300)]
    for bad, words in [
        ("lots", "expected auto, a number of stages"),
        (0, "expected auto"),
        (True, "expected auto"),
        ([{"size": 512, "steps": 10}, {"size": 256, "steps": 10}], "larger than the one before"),
        ([{"size": 512}], "exactly size and steps"),
        ([{"size": 99999, "steps": 1}], "stages[0].size"),
        ([], "expected auto"),
    ]:
        with pytest.raises(SchemaError) as err:
            merge(base, {"stages": bad})
        assert words in str(err.value), (bad, str(err.value))
    with pytest.raises(SchemaError):
        merge(base, {"stage_factor": 1.0})
    # Nothing silently ignored: a size or steps beside a list must agree with it.
    for key, value, words in [("size", 2048, "the list's last size is 512, but size says 2048"),
                              ("steps", 50, "the list's first steps is 10, but steps says 50")]:
        with pytest.raises(SchemaError) as err:
            merge(base, {"stages": [{"size": 256, "steps": 10}, {"size": 512, "steps": 5}], key: value})
        assert words in str(err.value)


def test_a_smaller_fit_scales_a_list_of_stages():
    p = StyleParams(size=1024, stages=(Stage(256, 50), Stage(1024, 20)))
    assert p.at_size(512).schedule() == [Stage(128, 50), Stage(512, 20)]
    assert StyleParams(size=1024).at_size(512).schedule() == plan(512, 300)


# ----------------------------------------------------------------------------- the engine's stages


def test_a_coarse_to_fine_run(engine, pair):
    content, style = pair
    seen = []
    p = StyleParams(size=64, steps=8, stages=(Stage(32, 8), Stage(64, 4)), frame_every=2, frame_max_size=48)
    result = engine.stylize(content, [(style, 1.0)], p, progress=lambda i: seen.append((i.step, i.steps, i.eta)))
    assert [s for s, _, _ in seen] == list(range(1, 13)) and {n for _, n, _ in seen} == {12}
    assert seen[-1][2] == 0.0 and all(eta > 0 for *_, eta in seen[:-1])
    assert result.steps == 12 and result.size == (64, 48) and result.image.size == (64, 48)
    assert len(result.frames) == 7 and {f.size for f in result.frames} == {(48, 36)}  # one frame size for all
    assert [(s["size"], s["steps"]) for s in result.stages] == [([32, 24], 8), ([64, 48], 4)]
    assert all(s["techniques"] == [] and s["why"] == "no memory budget" for s in result.stages)


def test_a_stage_larger_than_the_anchor_also_matches_the_style_at_the_anchor(engine, pair):
    """The anchor term is the style loss of the picture scaled down to the anchor size: it is in
    the big stage's loss (the reported style is larger by it) and in no stage at or under it."""
    content, style = pair
    p = StyleParams(size=96, steps=4, stages=(Stage(48, 4), Stage(96, 3)), frame_every=0, anchor_size=48)
    anchored = engine.stylize(content, [(style, 1.0)], p)
    assert [s["anchor"] for s in anchored.stages] == [None, [48, 36]]
    plain = engine.stylize(content, [(style, 1.0)], StyleParams(**{**p.__dict__, "anchor_size": 0}))
    assert [s["anchor"] for s in plain.stages] == [None, None]
    assert anchored.losses["style"] > plain.losses["style"]  # two style terms against one
    # and the scaled-down picture's own style loss is what it adds
    from nstd.engine import images
    from nstd.engine.losses import Objective
    grams = engine.style_grams(style, 48, p.style_layers, p.pooling)
    small = images.to_tensor(anchored.image.resize((48, 36), Image.Resampling.LANCZOS))
    with torch.no_grad():
        feats = engine.network.extractor(p.style_layers, p.pooling)(small)
    at_anchor = float(Objective({}, grams, 0.0, p.style_weight, 0.0).style_term({k: gram(feats[k]) for k in grams}))
    assert 0 < at_anchor < anchored.losses["style"]


def test_the_second_stage_starts_from_the_first(engine, pair):
    """Stage 2 begins at the first stage's picture upsampled: below a fresh run at its size, and
    still below it after as many steps."""
    content, style = pair
    fresh = []
    engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=5, stages=1, frame_every=0),
                   progress=lambda i: fresh.append(i.losses()["total"]))
    staged = []
    engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=20, stages=(Stage(32, 20), Stage(64, 5)),
                                                        frame_every=0),
                   progress=lambda i: staged.append(i.losses()["total"]))
    assert staged[20] < 0.8 * fresh[0] and staged[24] < fresh[4], (staged, fresh)


class StopAt(Progress):
    def __init__(self, step):
        self.step, self.now = step, 0

    def on_step(self, info):
        self.now = info.step

    def should_stop(self):
        return self.now == self.step


def test_stopped_at_a_stage_boundary_resumes_exactly(engine, pair):
    """A stop on a stage's last step keeps the picture the next stage would start from (the
    stage's best), so the resumed run is the run that was never stopped."""
    content, style = pair
    p = StyleParams(size=64, steps=6, stages=(Stage(32, 6), Stage(64, 4)), frame_every=0)
    whole = engine.stylize(content, [(style, 1.0)], p)
    with pytest.raises(Interrupted) as stop:
        engine.stylize(content, [(style, 1.0)], p, progress=StopAt(6))
    assert stop.value.checkpoint.step == 6 and stop.value.checkpoint.image.shape[-1] == 32
    resumed = engine.stylize(content, [(style, 1.0)], p, resume=stop.value.checkpoint)
    assert resumed.image.tobytes() == whole.image.tobytes()


class StopInATile(Progress):
    """Asks to stop after a number of heartbeats (tiles) have gone by."""

    def __init__(self, after):
        self.after, self.beats, self.steps = after, 0, 0

    def alive(self):
        self.beats += 1

    def on_step(self, info):
        self.steps = info.step

    def should_stop(self):
        return self.beats >= self.after


def test_a_stop_is_taken_within_a_tiled_step(engine, pair):
    content, style = pair
    p = StyleParams(size=96, steps=5, stages=1, frame_every=0)
    tiles = Techniques(20, False, 32)
    probe = StopInATile(10**9)
    engine.stylize(content, [(style, 1.0)], p, techniques=tiles, progress=probe)
    per_step = probe.beats // 7  # targets and the last check beat too; a step beats twice a tile
    stop = StopInATile(probe.beats - 2 * per_step)  # within step 4 or 5
    with pytest.raises(Interrupted) as err:
        engine.stylize(content, [(style, 1.0)], p, techniques=tiles, progress=stop)
    assert err.value.checkpoint.step == stop.steps  # the picture after the last whole step
    assert 1 <= stop.steps < 5


def test_interrupted_in_the_second_stage_resumes_there(engine, pair):
    content, style = pair
    p = StyleParams(size=64, steps=6, stages=(Stage(32, 6), Stage(64, 4)), frame_every=0)
    with pytest.raises(Interrupted) as stop:
        engine.stylize(content, [(style, 1.0)], p, progress=StopAt(8))
    ck = stop.value.checkpoint
    assert ck.step == 8 and ck.image.shape[-1] == 64
    result = engine.stylize(content, [(style, 1.0)], p, resume=ck)
    assert result.resumed_from == 8 and [s["steps_run"] for s in result.stages] == [2]
    with pytest.raises(Interrupted) as stop:  # stopped in stage 1: resumes there, then goes on
        engine.stylize(content, [(style, 1.0)], p, progress=StopAt(3))
    result = engine.stylize(content, [(style, 1.0)], p, resume=stop.value.checkpoint)
    assert [s["steps_run"] for s in result.stages] == [3, 4] and result.size == (64, 48)


# ----------------------------------------------------------------------------- the tiled pass


def _objective(ext, content, style, content_layers, style_layers):
    with torch.no_grad():
        cf, sf = ext(content), ext(style)
    return Objective({k: cf[k] for k in content_layers}, {k: gram(sf[k]) for k in style_layers}, 1.0, 1e4, 0.0)


@pytest.mark.parametrize("style_layers,content_layers,size,tile", [
    (["conv1_1", "conv2_1", "conv3_1"], ["conv3_2"], (100, 136), 32),  # many tiles, halos inside the picture
    (["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"], ["conv4_2"], (200, 264), 96),  # the defaults
])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_tiled_pass_equals_the_whole_pass(engine, style_layers, content_layers, size, tile, checkpoint):
    ext = engine.network.extractor(tuple(dict.fromkeys(content_layers + style_layers)), "avg")
    g = torch.Generator().manual_seed(0)
    content, style, x = (torch.rand(1, 3, *size, generator=g) for _ in range(3))
    obj = _objective(ext, content, style, content_layers, style_layers)
    tiler = Tiler(ext, tile, checkpoint=checkpoint)
    assert len(tiler.tiles(*size)) >= 4
    whole = x.clone().requires_grad_(True)
    losses = obj(ext(whole), whole)
    losses.total.backward()
    c, s, grad = tiler.loss_and_grad(x, obj)
    assert float(c) == pytest.approx(float(losses.content.detach()), rel=1e-4)
    assert float(s) == pytest.approx(float(losses.style.detach()), rel=1e-4)
    assert float((grad - whole.grad).norm() / whole.grad.norm()) < 1e-4
    assert float((grad - whole.grad).abs().max() / whole.grad.abs().max()) < 1e-4
    with torch.no_grad():
        full = ext(style)
    for k, v in tiler.grams(style, style_layers).items():
        assert float((v - gram(full[k])).abs().max() / gram(full[k]).abs().max()) < 1e-4
    for k, v in tiler.features(content, content_layers).items():
        assert float((v - ext(content)[k]).abs().max()) < 1e-4 * float(v.abs().max())


def test_a_halo_short_of_the_reach_is_wrong(engine):
    """The halo rule is what makes tiles exact: two grid steps less and the gradient is off."""
    layers = ["conv1_1", "conv2_1", "conv3_1"]
    ext = engine.network.extractor(("conv3_2", *layers), "avg")
    g = torch.Generator().manual_seed(1)
    content, style, x = (torch.rand(1, 3, 100, 136, generator=g) for _ in range(3))
    obj = _objective(ext, content, style, ["conv3_2"], layers)
    whole = x.clone().requires_grad_(True)
    obj(ext(whole), whole).total.backward()
    tiler = Tiler(ext, 32)
    assert tiler.halo == halo_for(ext) >= ext.reach
    tiler.halo -= 2 * ext.downsampling
    _, _, grad = tiler.loss_and_grad(x, obj)
    assert float((grad - whole.grad).norm() / whole.grad.norm()) > 1e-3


def test_tiles_cover_the_picture_once_and_start_on_the_grid():
    tiles = layout(1000, 1500, 384, 96)
    cover = torch.zeros(1000, 1500, dtype=torch.int)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert all(v % 16 == 0 for v in t.window[::2]) and t.window[1] in (1000, y1 + 96)
    assert bool((cover == 1).all())


def test_checkpointing_keeps_fewer_activations(engine):
    """Bytes autograd holds after the forward pass: checkpointed blocks keep their inputs and the
    wanted maps only. The same loss and gradient either way."""
    ext = engine.network.extractor(tuple(DEFAULT), "avg")

    def saved(checkpoint):
        x = torch.rand(1, 3, 96, 128, requires_grad=True, generator=torch.Generator().manual_seed(2))
        held: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sum(gram(f).sum() for f in ext(x, checkpoint=checkpoint).values())
        loss.backward()
        return sum(held.values()), float(loss.detach()), x.grad

    plain, ckpt = saved(False), saved(True)
    assert ckpt[0] < 0.7 * plain[0], (ckpt[0], plain[0])
    assert ckpt[1] == pytest.approx(plain[1], rel=1e-6) and torch.allclose(ckpt[2], plain[2], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- the memory fit


def test_the_model_counts_each_technique():
    p = lambda **kw: predict_peak_bytes(1536, 2048, DEFAULT, precision="bf16", device="cuda", **kw)  # noqa: E731
    assert p(checkpoint=True) < p()
    assert p(tile=512) < p(checkpoint=True)
    assert p(tile=512, checkpoint=True) < p(tile=512) and p(tile=256) < p(tile=512)
    assert p(history=5) < p(history=20)
    assert p(content_layers=["conv4_2"]) < p()


def test_4096_fits_4_gib_with_techniques_not_by_shrinking():
    kw = dict(layers=DEFAULT, precision="bf16", device="cuda", content_layers=["conv4_2"])
    t = choose(3072, 4096, 4 * GIB, **kw)
    assert t is not None and t.tile and t.history < 20
    assert predict_peak_bytes(3072, 4096, DEFAULT, "lbfgs", t.history, "bf16", "avg", "cuda", t.checkpoint, t.tile,
                              ["conv4_2"]) <= 4 * GIB
    assert fit_size(3072, 4096, 4 * GIB, min_long_edge=64, **kw) == (3072, 4096)
    # The cheapest that fits: a size that fits plain takes nothing.
    assert choose(384, 512, 4 * GIB, **kw) == Techniques(20)
    # Shrinking stays the last resort, for what nothing else fits.
    h, w = fit_size(6144, 8192, 4 * GIB, min_long_edge=64, **kw)
    assert w < 8192 and abs(w / h - 8192 / 6144) < 0.02
    assert fit_size(1536, 2048, 1, layers=DEFAULT) is None


def test_a_budget_picks_the_techniques_and_the_run_says_why(engine, pair):
    """At 96 px in 60 MiB (CPU model) the plain pass does not fit: the engine tiles and
    checkpoints, and the picture is the plain run's up to rounding."""
    content, style = pair
    p = StyleParams(size=96, steps=3, stages=1, frame_every=0)
    plain = engine.stylize(content, [(style, 1.0)], p)
    squeezed = engine.stylize(content, [(style, 1.0)], p, budget_bytes=60 * 2**20)
    record = squeezed.stages[0]
    assert any("tiled" in t for t in record["techniques"]), record
    assert "over the budget" in record["why"] or "most frugal" in record["why"]
    assert plain.stages[0]["techniques"] == [] and plain.stages[0]["lbfgs_history"] == 20
    assert squeezed.size == plain.size
    if record["lbfgs_history"] == 20:
        assert squeezed.losses["total"] == pytest.approx(plain.losses["total"], rel=1e-3)


def test_a_job_is_typed_once_and_its_defaults_are_the_keys_own():
    """Job.of: the keys as types, the stages planned once; the engine's parameters for the default
    job are StyleParams' own defaults (one source: the key table); a claim written before a key
    existed runs as it was taken."""
    from nstd.engine.params import StyleParams

    defaults = {k: f.default for k, f in JOB_FIELDS.items()}
    job = Job.of(merge(defaults, {"stages": [{"size": 256, "steps": 30}, {"size": 512, "steps": 10}]}))
    assert (job.size, job.steps, job.total_steps) == (512, 30, 40) and job.stages is job.stages
    assert job.stages == [Stage(256, 30), Stage(512, 10)] and job.gif.every == 5 and job.output.format == "png"
    assert Job.of(merge(defaults, {})).params() == StyleParams()
    old = {k: v for k, v in merge(defaults, {}).items() if k not in ("stages", "anchor_size", "grain", "output")}
    p = Job.of(old).params()
    assert (p.stages, p.anchor_size, p.grain, p.bits) == (1, 0, 0.0, 8)
