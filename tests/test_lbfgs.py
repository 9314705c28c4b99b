"""nstd's own L-BFGS (nstd/engine/lbfgs.py) against torch.optim.LBFGS, and its step without host syncs."""
from __future__ import annotations

import pytest
import torch

from nstd.engine.lbfgs import LBFGS


def _torch_losses(f, x0: torch.Tensor, steps: int, history: int) -> list[float]:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=history, tolerance_grad=-1, tolerance_change=-1)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    return [float(opt.step(closure).detach()) for _ in range(steps)]


def _our_losses(f, x0: torch.Tensor, steps: int, history: int, masked: bool = False) -> list[float]:
    x = x0.clone().requires_grad_(True)
    opt = LBFGS(x, history=history, masked=masked)
    out = []
    for _ in range(steps):
        x.grad = None
        loss = f(x)
        loss.backward()
        out.append(float(loss.detach()))
        opt.step(x.grad)
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-rows", "gpu-masked"])
def test_it_follows_torch_on_a_small_problem_through_a_full_history(masked):
    torch.manual_seed(0)
    a, b = torch.randn(40, 30), torch.randn(40)

    def f(x):
        return ((a @ x - b) ** 2).sum() + 0.1 * (x ** 4).sum()

    x0 = torch.randn(30)
    ours, theirs = _our_losses(f, x0, 30, history=5, masked=masked), _torch_losses(f, x0, 30, history=5)
    for mine, ref in zip(ours, theirs):  # the ring wraps five times over
        assert mine == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-rows", "gpu-masked"])
def test_it_follows_torch_on_the_style_objective(engine, pair, masked):
    """30 steps of the real Gatys objective at 48 px: final loss within 1 % of torch's."""
    from nstd.engine import images
    from nstd.engine.losses import Objective, gram

    content, style = pair
    net = engine.network
    layers = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1")
    extract = net.extractor(layers, "avg")
    c = images.to_tensor(images.resize_long_edge(content, 48))
    s = images.to_tensor(images.resize_long_edge(style, 48))
    with torch.no_grad():
        cf, sf = extract(c), extract(s)
    objective = Objective({"conv4_2": cf["conv4_2"]}, {k: gram(sf[k]) for k in layers if k != "conv4_2"}, 1.0, 1e4, 0.0)

    def f(x):
        return objective(extract(x), x).total

    ours, theirs = _our_losses(f, c, 30, history=20, masked=masked), _torch_losses(f, c, 30, history=20)
    assert ours[-1] == pytest.approx(theirs[-1], rel=0.01)
    assert ours[-1] < 0.5 * ours[0]  # and it does optimise


@pytest.mark.parametrize("masked", [False, True], ids=["cpu-rows", "gpu-masked"])
def test_a_non_positive_curvature_pair_is_left_out_and_restart_starts_afresh(masked):
    x = torch.zeros(3, requires_grad=True)
    opt = LBFGS(x, history=3, masked=masked)
    opt.step(torch.tensor([1.0, 0.0, 0.0]))
    assert int(opt.count) == 0 and not bool(opt.first)
    opt.step(torch.tensor([3.0, 0.0, 0.0]))  # y.s < 0: the gradient grew along the step
    assert int(opt.count) == 0
    opt.step(torch.tensor([1.0, 0.0, 0.0]))  # y.s > 0: kept
    assert int(opt.count) == 1
    opt.restart(torch.tensor(True))
    before = x.detach().clone()
    opt.step(torch.tensor([4.0, 0.0, 0.0]))
    assert int(opt.count) == 0  # history dropped
    # a first step's length: min(1, 1/|g|_1) = 0.25, along -g
    assert torch.allclose(x.detach() - before, torch.tensor([-1.0, 0.0, 0.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_makes_no_host_sync_on_a_gpu():
    x = torch.randn(3, 64, 64, device="cuda", requires_grad=True)
    opt = LBFGS(x, history=5)
    for i in range(8):  # warm-up: the allocator and the first steps
        x.grad = None
        (x ** 2).sum().backward()
        opt.step(x.grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x.grad = None
            (x.sin() ** 2).sum().backward()
            opt.step(x.grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_captured_step_gives_the_eager_result(pair, precision):
    """The whole step replayed from a CUDA graph: step by step the losses of eager steps (within
    1 %), on the last GPU (not the current one: the capture must follow the engine's device)."""
    from nstd.engine import Engine, StyleParams
    from nstd.engine.progress import Progress

    class Record(Progress):
        def __init__(self):
            self.totals = []

        def on_step(self, info):
            self.totals.append(info.losses()["total"])

    content, style = pair
    device = f"cuda:{torch.cuda.device_count() - 1}"
    p = StyleParams(size=128, steps=40, frame_every=5)
    runs, totals = {}, {}
    for graphs in (False, True):
        engine = Engine(device=device, precision=precision, cuda_graphs=graphs)
        rec = Record()
        runs[graphs] = engine.stylize(content, [(style, 1.0)], p, progress=rec)
        totals[graphs] = rec.totals
    assert runs[True].cuda_graph and not runs[False].cuda_graph
    assert len(totals[True]) == len(totals[False]) == 40
    for step, (a, b) in enumerate(zip(totals[True], totals[False]), 1):
        assert a == pytest.approx(b, rel=0.01), f"step {step}"
    for key in ("content", "style", "total"):
        assert runs[True].losses[key] == pytest.approx(runs[False].losses[key], rel=0.01), key
    assert len(runs[True].frames) == len(runs[False].frames)


def test_both_paths_agree_after_an_infinite_gradient_and_the_guards_restart():
    """An infinite gradient makes an infinite pair (y.s = +inf). The guard then puts the picture
    back and restarts the history; the pair must not have been kept, or its stale row, though
    masked by a zero in the masked recursion (inf x 0 = NaN), would poison every later step."""
    xs = {}
    for masked in (False, True):
        x = torch.zeros(3, requires_grad=True)
        opt = LBFGS(x, history=2, masked=masked)
        opt.step(torch.tensor([1.0, 0.0, 0.0]))
        opt.step(torch.tensor([1e3, 0.0, 0.0]))
        saved = x.detach().clone()
        opt.step(torch.tensor([float("-inf"), 0.0, 0.0]))
        with torch.no_grad():
            x.copy_(saved)  # what the guard does after a step that is not finite
        opt.restart(torch.tensor(True))
        for g in ([1.0, 0.0, 1.0], [0.5, 0.0, 0.25], [0.2, 0.0, 0.1]):
            opt.step(torch.tensor(g))
        xs[masked] = x.detach()
    assert torch.isfinite(xs[True]).all(), xs
    assert torch.equal(xs[True], xs[False])


def test_on_the_cpu_no_graph_is_tried(engine, pair):
    from nstd.engine import StyleParams

    content, style = pair
    r = engine.stylize(content, [(style, 1.0)], StyleParams(size=32, steps=6, frame_every=0))
    assert not r.cuda_graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frames_read_behind_the_steps_are_the_frames_read_at_once(pair):
    """On CUDA the GIF's frames are copied asynchronously (pinned memory, an event) and made into
    pictures later: the same frames, in the same order, as reading each at once."""
    import numpy as np

    from nstd.engine import Engine, StyleParams

    content, style = pair
    p = StyleParams(size=96, steps=30, frame_every=3)
    got = {}
    device = f"cuda:{torch.cuda.device_count() - 1}"  # not the current GPU: the event must follow the frame's
    for asynchronous in (False, True):
        engine = Engine(device=device, precision="fp32", cuda_graphs=False)
        engine.async_frames = asynchronous
        got[asynchronous] = engine.stylize(content, [(style, 1.0)], p).frames
    assert len(got[True]) == len(got[False]) == 11
    for a, b in zip(got[True], got[False]):
        assert a.size == b.size
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() < 1.0


def test_a_step_that_cannot_be_captured_leaves_the_run_eager_with_one_log_line(engine):
    """The fallback of StepGraphs.capture, reached on the CPU: capture fails, nothing ran, None, and
    that kind of step is not tried again by this engine."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    ran = []
    try:
        x = torch.zeros(3)
        assert engine.graphs.capture(lambda: ran.append("step"), lambda: ran.append("warm"), lambda: x.sum(),
                                     ("k",)) is None
    finally:
        logger.remove(sink)
    assert "step" not in ran and torch.equal(x, torch.zeros(3))
    assert len(lines) == 1 and "cannot be captured in a CUDA graph" in lines[0] and "running it eagerly" in lines[0]
    assert ("k",) in engine.graphs.refused
    engine.graphs.refused.clear()


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replaying runs the step eagerly (what a good
    graph does), or nothing (an empty graph)."""

    def __init__(self, step, empty: bool):
        self.step, self.empty, self.replays = step, empty, 0

    def replay(self) -> None:
        self.replays += 1
        if not self.empty:
            self.step()


@pytest.mark.parametrize("outcome", ["captured", "empty", "raises", "out of memory", "ended by CUDA"])
def test_the_step_loop_with_a_graph_gives_the_eager_result(engine, pair, monkeypatch, outcome):
    """The step loop's graph branches, on the CPU with a stand-in graph: a captured step replayed
    from the warm-up on, a graph that replays nothing, a capture that fails. Each gives the eager
    run's picture exactly (no step run twice, none left out), the same steps and frames; a failed
    kind of step is not captured again."""
    import numpy as np

    from nstd.engine import StyleParams
    from nstd.engine import graph

    content, style = pair
    p = StyleParams(size=32, steps=8, frame_every=2)
    monkeypatch.setattr(engine.graphs, "possible", lambda: engine.cuda_graphs)
    monkeypatch.setattr(graph, "WARMUP_STEPS", 10**6)  # the masked L-BFGS, never captured: the yardstick
    eager = engine.stylize(content, [(style, 1.0)], p)
    monkeypatch.setattr(graph, "WARMUP_STEPS", 3)
    graphs: list[_FakeGraph] = []

    calls = []

    def record(dev, step, warm, side):
        calls.append(1)
        warm()
        if outcome == "raises":
            raise graph.CaptureFailed(RuntimeError("operation not permitted when stream is capturing"), clean=True)
        if outcome == "ended by CUDA":
            raise graph.CaptureFailed(RuntimeError("operation not permitted when stream is capturing"), clean=False)
        if outcome == "out of memory":
            raise graph.CaptureFailed(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB"), True)
        graphs.append(_FakeGraph(step, empty=outcome == "empty"))
        return graphs[-1]

    monkeypatch.setattr(graph, "record_graph", record)
    monkeypatch.setattr(engine.graphs, "side_stream", lambda: None)
    try:
        got = engine.stylize(content, [(style, 1.0)], p)
        again = engine.stylize(content, [(style, 1.0)], p)
        engine_refused = bool(engine.graphs.refused)
        graphs_on = engine.cuda_graphs
    finally:
        engine.graphs.refused.clear()
        engine.cuda_graphs = True
    assert not eager.cuda_graph
    assert np.array_equal(np.asarray(got.image), np.asarray(eager.image))
    assert got.steps == eager.steps and len(got.frames) == len(eager.frames)
    assert got.losses == pytest.approx(eager.losses, rel=1e-6)
    assert got.cuda_graph == (outcome == "captured")
    if outcome == "captured":
        # captured at the 4th step and replayed as it and as each step after it; again next run
        assert [g.replays for g in graphs] == [p.steps - 3] * 2
        assert np.array_equal(np.asarray(again.image), np.asarray(eager.image))
    elif outcome == "ended by CUDA":  # the allocator may be left unsure: no graph again in this engine
        assert not graphs and not again.cuda_graph and not graphs_on and len(calls) == 1
    elif outcome == "out of memory":  # eager for that stage only: the next run tries again
        assert not graphs and not again.cuda_graph and not engine_refused and len(calls) == 2
        assert np.array_equal(np.asarray(again.image), np.asarray(eager.image))
    else:
        assert len(graphs) == (1 if outcome == "empty" else 0) and not again.cuda_graph and engine_refused


@pytest.mark.parametrize("size", [(40, 30), (160, 120)], ids=["frame-size", "bigger-than-frames"])
def test_frames_read_behind_the_steps_on_the_cpu(monkeypatch, size):
    """Frames' asynchronous path with CUDA's event and pinned memory stood in for: the event is
    recorded on the frame's own device's stream, the frames come out in order and at the frame
    size, as the synchronous path makes them (exactly where no resize is needed)."""
    import numpy as np

    from nstd.engine import images
    from nstd.engine import readbehind

    recorded = []

    class Event:
        def __init__(self):
            self.done = False

        def record(self, stream):
            recorded.append(stream)

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", str(device)))
    monkeypatch.setattr(readbehind, "pinned_like", lambda t: torch.empty_like(t))
    frame_size = (40, 30)
    sync = readbehind.Frames(lambda t: readbehind.frame_of(t, frame_size, None, shown=True), [], asynchronous=False)
    behind = readbehind.Frames(None, [], asynchronous=True, size=frame_size)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        shown = torch.rand((1, 3, size[1], size[0]), generator=g)
        sync.add(shown)
        behind.add(shown)
    assert len(behind) == 3 and len(behind.done) == 0 and recorded == [("stream of", "cpu")] * 3
    got, want = behind.all(), sync.all()
    assert [f.size for f in got] == [frame_size] * 3
    for a, b in zip(got, want):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() == 0 if size == frame_size else diff.mean() < 3


def test_losses_read_behind_the_steps_on_the_cpu(monkeypatch):
    """LossTap with CUDA's event and pinned memory stood in for: nothing is returned before a
    copy has landed; then the newest landed step's losses, never a slot a newer copy was queued
    into (the ring has 8 slots: step 9 reuses step 1's)."""
    from nstd.engine import readbehind
    from nstd.engine.losses import Losses

    class Event:
        def __init__(self):
            self.done = False

        def record(self, stream):
            self.done = False  # a new copy queued behind it

        def query(self):
            return self.done

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(readbehind, "pinned_like", lambda t: torch.empty_like(t))
    tap = readbehind.LossTap()
    for step in range(1, 11):
        v = torch.tensor(float(step))
        tap.add(step, Losses(v, v * 2, v * 0, v * 3))
    assert tap.landed() is None
    for slot in tap.slots:
        slot[2].done = slot[0] <= 8  # steps 9 and 10 still under way
    assert tap.landed() == (8, {"content": 8.0, "style": 16.0, "tv": 0.0, "total": 24.0})
    for slot in tap.slots:
        slot[2].done = True
    assert tap.landed()[0] == 10


def test_a_capture_cuda_ended_gives_its_pool_back(monkeypatch):
    """release_pool, the one path after a capture CUDA ended under torch, with torch's private
    calls stood in for: the allocator stops routing to the pool, then frees it, on the engine's
    GPU; a failing call does not stop the next."""
    from nstd.engine import graph

    calls = []

    def end(index, pool):
        calls.append(("end", index, pool))
        raise RuntimeError("no such pool")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda index, pool: calls.append(("release", index, pool)),
                        raising=False)
    graph.release_pool(torch.device("cuda", 1), (0, 7))
    assert calls == [("end", 1, (0, 7)), ("release", 1, (0, 7))]
