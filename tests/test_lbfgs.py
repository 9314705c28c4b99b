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
    for asynchronous in (False, True):
        engine = Engine(device="cuda", precision="fp32", cuda_graphs=False)
        engine.async_frames = asynchronous
        got[asynchronous] = engine.stylize(content, [(style, 1.0)], p).frames
    assert len(got[True]) == len(got[False]) == 11
    for a, b in zip(got[True], got[False]):
        assert a.size == b.size
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() < 1.0


def test_a_step_that_cannot_be_captured_leaves_the_run_eager_with_one_log_line(engine):
    """The fallback of Engine._capture, reached on the CPU: capture fails, nothing ran, None."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    ran = []
    try:
        x = torch.zeros(3)
        assert engine._capture(lambda: ran.append("step"), lambda: ran.append("warm"), x) is None
    finally:
        logger.remove(sink)
    assert "step" not in ran and torch.equal(x, torch.zeros(3))
    assert len(lines) == 1 and "cannot be captured in a CUDA graph" in lines[0] and "running it eagerly" in lines[0]
