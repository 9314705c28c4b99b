"""The style loss kinds (job key style_loss: gram | w2 | sliced, nstd/engine/styleloss.py): each is
0 for a style against itself, differentiable as its finite differences say, exact over tiles where
it claims to be (refused there where not), blends, runs, resumes and captures like Gram."""
import numpy as np
import pytest
import torch
from PIL import Image

from nstd.engine import StyleImage, StyleParams, TargetCache, images
from nstd.engine.losses import GRAM, Objective, blend
from nstd.engine.memory import Techniques
from nstd.engine.progress import Interrupted, Progress
from nstd.engine.schedule import Stage
from nstd.engine.styleloss import SlicedLoss, StyleLossError, W2Loss, quantiles, style_kind
from nstd.engine.tiles import Tiler

LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
KINDS = ["gram", "w2", "sliced"]


def _feats(engine, img: Image.Image, edge: int, layers=LAYERS) -> dict:
    with torch.no_grad():
        return engine.network.extractor(layers, "avg")(images.to_tensor(images.resize_long_edge(img, edge)))


@pytest.mark.parametrize("name", KINDS)
def test_zero_for_the_style_against_itself_positive_for_another_picture(engine, pair, name):
    content, style = pair
    kind = style_kind(name, seed=3, stage=1)
    fs, fc = _feats(engine, style, 64), _feats(engine, content, 48)  # another picture, another size
    for layer in LAYERS:
        target = kind.target(layer, kind.style_stat(layer, fs[layer]))
        for step in range(kind.sets):  # the sliced kind: under each of its sets of directions
            kind.at(step)
            self_loss = float(target.loss(kind.stat(layer, fs[layer])))
            other = float(target.loss(kind.stat(layer, fc[layer])))
            # w2: the Newton-Schulz square root's residue (measured under 1.2e-3 at 256 px, NS_ITERS = 20)
            assert abs(self_loss) < (5e-3 if name == "w2" else 1e-6), (layer, step, self_loss)
            assert other > 0.03, (layer, step, other)


@pytest.mark.parametrize("name", KINDS)
def test_gradients_match_finite_differences(name):
    """The loss of each kind as a function of a tiny feature map, in float64."""
    g = torch.Generator().manual_seed(0)
    kind = style_kind(name, seed=1)
    style = torch.rand(1, 4, 3, 4, generator=g, dtype=torch.float64)
    target = kind.target("conv1_1", kind.style_stat("conv1_1", style))
    f = torch.rand(1, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kind.at(3)  # the sliced kind: a set other than the first
    assert torch.autograd.gradcheck(lambda t: target.loss(kind.stat("conv1_1", t)), (f,), eps=1e-6, atol=1e-6)


def test_w2_square_root_and_sliced_resampling():
    from nstd.engine.styleloss import sqrtm_trace

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 6, 6, generator=g, dtype=torch.float64)
    a = a @ a.mT + 0.1 * torch.eye(6, dtype=torch.float64)
    assert float(sqrtm_trace(a, 30)) == pytest.approx(float(torch.linalg.eigvalsh(a).sqrt().sum()), rel=1e-6)
    rows = torch.arange(8.0).reshape(1, 1, 8)
    assert torch.equal(quantiles(rows, 8), rows)
    assert torch.allclose(quantiles(rows, 4), torch.tensor([[[0.5, 2.5, 4.5, 6.5]]]))


def test_sliced_directions_are_fixed_by_seed_stage_and_layer():
    a, b = SlicedLoss(7, 2), SlicedLoss(7, 2)
    d = a.directions("conv2_1", 128, torch.device("cpu"), torch.float32)
    assert d.shape == (8, 128, 128) and torch.allclose(d.norm(dim=1), torch.ones(8, 128))
    one = SlicedLoss(7, 2, sets=1).directions("conv2_1", 128, torch.device("cpu"), torch.float32)
    assert one.shape == (1, 128, 128) and torch.equal(one[0], d[0])  # the first set: as with one set
    assert all(not torch.equal(d[i], d[j]) for i in range(8) for j in range(i))
    assert torch.equal(d, b.directions("conv2_1", 128, torch.device("cpu"), torch.float32))
    assert not torch.equal(d, SlicedLoss(7, 3).directions("conv2_1", 128, torch.device("cpu"), torch.float32))
    assert not torch.equal(d, SlicedLoss(8, 2).directions("conv2_1", 128, torch.device("cpu"), torch.float32))


def test_sliced_steps_cycle_through_the_sets_in_place():
    """Step s matches set s mod 8: the picture's projections on that set's directions against the
    style's on the same set, chosen by one index tensor changed in place (a captured graph reads
    it), and each set another loss for a picture that is not the style."""
    g = torch.Generator().manual_seed(2)
    style, pic = torch.rand(1, 6, 5, 5, generator=g), torch.rand(1, 6, 4, 4, generator=g)
    kind = SlicedLoss(1, 0)
    target = kind.target("conv1_1", kind.style_stat("conv1_1", style))
    index = kind.index(style.device)
    dirs = kind.directions("conv1_1", 6, style.device, style.dtype)
    losses = []
    for step in (0, 1, 9, 7, 14):
        kind.at(step)
        assert kind.index(style.device) is index and int(index) == step % 8
        d = dirs[step % 8]
        mine = (d.T @ pic.reshape(1, 6, -1)).sort(dim=-1).values
        assert torch.equal(kind.stat("conv1_1", pic), mine)
        goal = quantiles((d.T @ style.reshape(1, 6, -1)).sort(dim=-1).values, 16)
        assert torch.allclose(target.loss(mine), (mine - goal).pow(2).mean() * target.inv_scale)
        losses.append(float(target.loss(mine)))
    assert losses[1] == losses[2] and len({round(v, 9) for v in losses}) == 4, losses  # 1 and 9: one set


def test_a_sliced_target_keeps_at_most_its_quantiles(monkeypatch):
    """A style with more positions than SLICED_QUANTILES is kept as that many quantiles of each
    projection (its memory then does not grow with the size), read at the picture's count each
    step; the style against itself then scores the interpolation's residue only."""
    from nstd.engine import styleloss

    monkeypatch.setattr(styleloss, "SLICED_QUANTILES", 64)
    g = torch.Generator().manual_seed(3)
    style = torch.rand(1, 4, 20, 20, generator=g)
    kind = SlicedLoss(0, 0, sets=2)
    kept = kind.style_stat("conv1_1", style)
    assert kept.shape == (2, 1, 4, 64)
    for i, d in enumerate(kind.directions("conv1_1", 4, style.device, style.dtype)):
        assert torch.allclose(kept[i], quantiles((d.T @ style.reshape(1, 4, -1)).sort(dim=-1).values, 64))
    target = kind.target("conv1_1", kept)
    for step in range(2):
        kind.at(step)
        itself, other = (float(target.loss(kind.stat("conv1_1", f))) for f in (style, style * 0.5))
        assert 0 < itself < 0.01 * other and other > 0.1, (itself, other)


@pytest.mark.parametrize("name", KINDS)
def test_a_blend_of_one_style_is_that_style(engine, pair, name):
    _, style = pair
    kind = style_kind(name)
    one = {k: kind.style_stat(k, v) for k, v in _feats(engine, style, 48).items()}
    blended = blend([one], [1.0], kind)
    for k in LAYERS:
        for a, b in zip(kind.unpack(one[k]), kind.unpack(blended[k])):
            assert torch.equal(a, b)
    twice = blend([one, one], [2.0, 1.0], kind)  # a blend of a style with itself is the style again
    for k in LAYERS:
        for a, b in zip(kind.unpack(one[k]), kind.unpack(twice[k])):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_w2_blends_the_mixtures_moments_and_sliced_the_quantiles():
    f1, f2 = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4) + 1
    w2 = W2Loss()
    mu, m = blend([{"x": w2.stat("x", f1)}, {"x": w2.stat("x", f2)}], [3.0, 1.0], w2)["x"]
    both = torch.cat([f1, f1, f1, f2], dim=-1)  # the mixture: 3 parts of f1, 1 of f2
    assert torch.allclose(mu, w2.stat("x", both)[0], atol=1e-6) and torch.allclose(m, w2.stat("x", both)[1], atol=1e-5)
    s = SlicedLoss()
    q = blend([{"x": s.stat("x", f1)}, {"x": s.stat("x", f2)}], [1.0, 1.0], s)["x"]
    assert torch.allclose(q, (s.stat("x", f1) + s.stat("x", f2)) / 2)


@pytest.mark.parametrize("name,dtype,tol", [("gram", torch.float32, 1e-4), ("w2", torch.float64, 1e-6),
                                            ("w2", torch.float32, 1e-3)])
def test_the_tiled_pass_equals_the_whole_pass(engine, name, dtype, tol):
    """Exact over tiles. W2's gradient is exact in fp64 (measured 1e-8); in fp32 the whole pass's own
    gradient is 4.8e-4 from fp64's (the covariance's cancellation, the square root's iterations),
    and the tiled one 2.4e-4 from the whole's."""
    import copy

    style_layers, content_layers, size = ["conv1_1", "conv2_1", "conv3_1"], ["conv3_2"], (100, 136)
    kind = style_kind(name)
    ext = engine.network.extractor(tuple(content_layers + style_layers), "avg")
    if dtype == torch.float64:
        ext = copy.deepcopy(ext).double()  # a copy: the engine's network stays fp32
    g = torch.Generator().manual_seed(0)
    content, style, x = (torch.rand(1, 3, *size, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    with torch.no_grad():
        cf, sf = ext(content), ext(style)
    obj = Objective({k: cf[k] for k in content_layers}, {k: kind.style_stat(k, sf[k]) for k in style_layers}, 1.0,
                    1e4, 0.0, kind)
    tiler = tiled_against_whole(ext, obj, x, tol)
    for k, v in tiler.stats(style, style_layers, kind).items():
        for a, b in zip(kind.unpack(v), kind.unpack(kind.style_stat(k, sf[k]))):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-4


def tiled_against_whole(ext, obj, x, tol):
    """The tiled pass (32 px tiles, at least 4) against the whole one at `x`: the content and
    style losses and the gradient agree within `tol`. The tiler."""
    tiler = Tiler(ext, 32)
    assert len(tiler.tiles(*x.shape[-2:])) >= 4
    whole = x.clone().requires_grad_(True)
    losses = obj(ext(whole), whole)
    losses.total.backward()
    c, s, grad = tiler.loss_and_grad(x, obj)
    assert float(c) == pytest.approx(float(losses.content.detach()), rel=tol)
    assert float(s) == pytest.approx(float(losses.style.detach()), rel=tol)
    assert float((grad - whole.grad).norm() / whole.grad.norm()) < tol
    return tiler


def test_a_sliced_target_pass_in_tiles_gathers_the_same_projections(engine):
    ext = engine.network.extractor(("conv1_1", "conv2_1"), "avg")
    style = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    kind = SlicedLoss(0, 0)
    with torch.no_grad():
        whole = {k: kind.style_stat(k, v) for k, v in ext(style).items()}
    for k, v in Tiler(ext, 32).stats(style, ["conv1_1", "conv2_1"], kind).items():
        assert v.shape == whole[k].shape and float((v - whole[k]).abs().max()) < 1e-4 * float(whole[k].abs().max())


def test_sliced_is_refused_tiled_with_a_clear_message(engine, pair):
    content, style = pair
    ext = engine.network.extractor(("conv1_1",), "avg")
    kind = SlicedLoss()
    obj = Objective({}, {"conv1_1": kind.style_stat("conv1_1", ext(torch.rand(1, 3, 32, 32))["conv1_1"].detach())},
                    1.0, 1e4, 0.0, kind)
    with pytest.raises(StyleLossError, match="sliced cannot run in tiles"):
        Tiler(ext, 16).loss_and_grad(torch.rand(1, 3, 48, 48), obj)
    p = StyleParams(size=96, steps=2, stages=1, frame_every=0, style_loss="sliced")
    with pytest.raises(StyleLossError, match="gram or w2"):
        engine.stylize(content, [(style, 1.0)], p, techniques=Techniques(20, False, 32))
    big = StyleParams(size=2048, steps=2, stages=1, style_loss="sliced")
    with pytest.raises(StyleLossError) as err:
        engine.fit(content.size, big, 4 * 2**30)
    msg = str(err.value)
    assert "style_loss: sliced" in msg and "2048x1536" in msg and "4096 MiB" in msg, msg
    assert "gram or w2 can run this size tiled" in msg, msg
    with pytest.raises(StyleLossError, match="style_loss: sliced"):
        engine.techniques(1536, 2048, big, 4 * 2**30)
    # gram and w2 take tiles there; sliced fits untiled at a size that fits
    assert engine.techniques(1536, 2048, StyleParams(size=2048, style_loss="w2"), 4 * 2**30)[0].tile
    assert engine.fit(content.size, StyleParams(size=256, style_loss="sliced"), 4 * 2**30) == 256
    assert engine.fit(content.size, StyleParams(size=2048, style_loss="w2"), 4 * 2**30) == 2048


class Record(Progress):
    def __init__(self):
        self.styles = []

    def on_step(self, info):
        self.styles.append(info.losses()["style"])


@pytest.mark.parametrize("name,color", [("w2", "none"), ("sliced", "none"), ("w2", "luminance"),
                                        ("sliced", "luminance")])
def test_a_run_lowers_its_style_loss(engine, pair, name, color):
    content, style = pair
    rec = Record()
    p = StyleParams(size=48, steps=12, stages=1, frame_every=0, style_loss=name, preserve_color=color)
    result = engine.stylize(content, [(style, 1.0)], p, progress=rec)
    assert result.size == (48, 36) and len(rec.styles) == 12
    assert result.losses["style"] < 0.6 * rec.styles[0], rec.styles


@pytest.mark.parametrize("name", ["w2", "sliced"])
def test_with_the_anchor_and_a_blend_of_two_styles(engine, pair, images_dir, name):
    from nstd.engine import open_image

    content, style = pair
    other = open_image(images_dir / "the_scream.jpg")
    p = StyleParams(size=96, steps=3, stages=(Stage(48, 3), Stage(96, 2)), frame_every=0, anchor_size=48,
                    style_loss=name)
    r = engine.stylize(content, [(style, 1.0), (other, 0.5)], p)
    assert [s["anchor"] for s in r.stages] == [None, [48, 36]] and np.isfinite(r.losses["total"])


def test_a_sliced_run_stopped_and_resumed_is_the_unstopped_run(engine, pair):
    """Stopped between its stages: the resumed run draws the second stage's directions from
    (seed, stage, layer) as the unstopped run did, and ends on the same picture byte for byte."""
    from test_stages import StopAt

    content, style = pair
    p = StyleParams(size=64, steps=5, stages=(Stage(32, 5), Stage(64, 3)), frame_every=0, style_loss="sliced", seed=4)
    whole = engine.stylize(content, [(style, 1.0)], p)
    with pytest.raises(Interrupted) as stop:
        engine.stylize(content, [(style, 1.0)], p, progress=StopAt(5))
    resumed = engine.stylize(content, [(style, 1.0)], p, resume=stop.value.checkpoint)
    assert resumed.image.tobytes() == whole.image.tobytes()


def test_targets_are_cached_per_kind(engine, pair):
    content, style = pair
    cache = TargetCache()
    s = [StyleImage(style, 1.0, "digest")]
    for name in ("gram", "w2", "gram", "w2"):
        p = StyleParams(size=48, style_loss=name)
        engine.style_targets(s, content.size, p, cache, kind=style_kind(name))
    assert cache.counts() == {"hits": 2, "misses": 2}
    engine.style_targets(s, content.size, p, cache, kind=SlicedLoss(0, 0))
    engine.style_targets(s, content.size, p, cache, kind=SlicedLoss(0, 1))  # other directions
    assert cache.counts() == {"hits": 2, "misses": 4}


@pytest.mark.parametrize("name", KINDS)
def test_a_step_reads_nothing_from_the_host(engine, pair, monkeypatch, name):
    """What a CUDA graph needs of the loss: no .item(), no Python branch on a tensor's value."""
    content, style = pair
    kind = style_kind(name)
    fc, fs = _feats(engine, content, 48, ("conv4_2", *LAYERS)), _feats(engine, style, 48)
    obj = Objective({"conv4_2": fc["conv4_2"]}, {k: kind.style_stat(k, fs[k]) for k in LAYERS}, 1.0, 1e4, 0.0, kind)
    x = images.to_tensor(images.resize_long_edge(content, 48)).requires_grad_(True)
    ext = engine.network.extractor(("conv4_2", *LAYERS), "avg")
    obj(ext(x), x)  # the first (eager) step: a sliced target resamples itself to the picture once

    def refuse(*a, **k):
        raise AssertionError("a host read in a step")
    for attr in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    obj(ext(x), x).total.backward()
    monkeypatch.undo()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _FakeGraph:
    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self) -> None:
        self.replays += 1
        self.step()


@pytest.mark.parametrize("name", ["w2", "sliced"])
def test_the_capture_path_gives_the_eager_result(engine, pair, monkeypatch, name):
    """The step loop's graph branch with a stand-in graph (as test_lbfgs.py does for Gram): a w2 or
    sliced step captured after the warm-up and replayed gives the eager run's picture exactly."""
    content, style = pair
    p = StyleParams(size=32, steps=7, frame_every=0, style_loss=name)
    eager, got, graphs = eager_and_captured(engine, monkeypatch, lambda: engine.stylize(content, [(style, 1.0)], p))
    assert got.cuda_graph and [g.replays for g in graphs] == [p.steps - 3]
    assert np.array_equal(np.asarray(got.image), np.asarray(eager.image))


def eager_and_captured(engine, monkeypatch, run):
    """`run()` eager (never captured), then with a stand-in graph recorded after 3 warm-up steps:
    (the eager result, the captured one, the graphs)."""
    from nstd.engine import graph

    monkeypatch.setattr(engine.graphs, "possible", lambda: engine.cuda_graphs)
    monkeypatch.setattr(graph, "WARMUP_STEPS", 10**6)  # the masked L-BFGS, never captured
    eager = run()
    monkeypatch.setattr(graph, "WARMUP_STEPS", 3)
    graphs = []

    def record(dev, step, warm, side):
        warm()
        graphs.append(_FakeGraph(step))
        return graphs[-1]

    monkeypatch.setattr(graph, "record_graph", record)
    monkeypatch.setattr(engine.graphs, "side_stream", lambda: None)
    try:
        got = run()
    finally:
        engine.graphs.refused.clear()
    return eager, got, graphs


def test_an_unknown_style_loss_is_refused(engine, pair):
    content, style = pair
    with pytest.raises(ValueError, match="unknown style_loss"):
        engine.stylize(content, [(style, 1.0)], StyleParams(size=32, steps=1, style_loss="fft"))
    assert style_kind("gram") is GRAM
