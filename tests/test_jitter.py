"""The jitter (nstd/engine/jitter.py): the shifted view, its content targets, where it is left off,
what the memory model counts for it, and a run with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nstd.engine import jitter
from nstd.engine.jitter import Jitter, shifts
from nstd.engine.losses import Target


def test_the_shifts_are_fixed_start_unshifted_and_stay_inside_the_pad():
    s = shifts(8)
    assert s == shifts(8) and len(s) == jitter.SHIFTS and s[0] == (8, 8)
    assert all(0 <= dy <= 16 and 0 <= dx <= 16 for dy, dx in s)
    assert len(set(s)) == len(s)  # eight different phases
    # every parity of rows and columns is met, so even the 2 px lattice of pool1 moves
    assert {(dy % 2, dx % 2) for dy, dx in s} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert shifts(0) == [(0, 0)]
    for seed in (1, 2, 2**63 - 1):  # another seed: the same phases in another order
        assert shifts(8, seed) != s and sorted(shifts(8, seed)) == sorted(s)


def test_the_view_is_the_picture_moved_and_reflected_at_its_edges():
    x = torch.arange(2 * 3 * 12 * 10, dtype=torch.float32).reshape(2, 3, 12, 10)
    j = Jitter(4, (12, 10), "cpu")
    j.shifts = [(4, 4), (5, 4), (4, 2)]
    j.at(0)
    assert torch.equal(j.view(x), x)  # (pad, pad): unshifted
    j.at(1)  # one row down the padded picture: the picture moved up a row, its last row reflected
    v = j.view(x)
    assert torch.equal(v[..., :-1, :], x[..., 1:, :]) and torch.equal(v[..., -1, :], x[..., -2, :])
    j.at(2)  # two columns left of unshifted: moved right by two, the first columns mirrored
    v = j.view(x)
    assert torch.equal(v[..., :, 2:], x[..., :, :-2]) and torch.equal(v[..., :, 0], x[..., :, 2])
    assert v.shape == x.shape


def test_the_shift_is_set_in_place_so_a_captured_graph_reads_each_steps_shift():
    j = Jitter(8, (32, 40), "cpu")
    ptrs = (j.rows.data_ptr(), j.cols.data_ptr(), j.index.data_ptr())
    for step in range(20):
        j.at(step)
        assert int(j.index) == step % jitter.SHIFTS
        dy, dx = j.shifts[step % jitter.SHIFTS]
        assert int(j.rows[0]) == dy and int(j.cols[0]) == dx
    assert (j.rows.data_ptr(), j.cols.data_ptr(), j.index.data_ptr()) == ptrs


def test_a_small_picture_gets_a_smaller_pad_and_no_pad_means_the_picture_itself():
    assert Jitter(8, (6, 40), "cpu").pad == 5  # reflection needs a pad under the size
    x = torch.rand(1, 3, 6, 40)
    j = Jitter(0, (6, 40), "cpu")
    assert j.shifts == [(0, 0)] and j.view(x) is x


def test_each_shifts_content_target_is_the_contents_features_under_that_shift():
    """Like with like: the content itself, seen under any shift, is at zero content loss; another
    shift's view of it is not."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    extract = lambda t: {"a": conv(t), "b": conv(t).relu()}  # noqa: E731
    content = torch.rand(1, 3, 20, 24)
    j = Jitter(4, (20, 24), "cpu")
    with torch.no_grad():
        targets = j.content_targets(content, ["a", "b"], extract)
        for i in range(len(j.shifts)):
            j.at(i)
            f = extract(j.view(content))
            assert float(targets["a"].loss(f["a"])) == pytest.approx(0.0, abs=1e-10)
            assert float(targets["b"].loss(f["b"])) == pytest.approx(0.0, abs=1e-10)
            assert float(targets["a"].loss(f["a"] + 0.1)) == pytest.approx(
                float(Target.of(f["a"]).loss(f["a"] + 0.1)), rel=1e-5)
        j.at(1)
        assert float(targets["a"].loss(extract(content)["a"])) > 1e-3


def test_the_stages_end_judges_the_last_and_the_best_picture_alike():
    """Guard.settle: a jittered stage's best loss was seen under another shift than the last
    picture's, so the best is measured again (judge) before the last one is given up."""
    from nstd.engine.guard import Guard
    from nstd.engine.losses import Losses

    def losses(total):
        t = torch.tensor(float(total))
        return Losses(t, t, torch.tensor(0.0), t)

    def guard_with_best(total):
        g = Guard(torch.zeros(1, 3, 4, 4))
        g.saw(losses(total), torch.full((1, 3, 4, 4), 0.5))
        return g

    x = torch.ones(1, 3, 4, 4)
    g = guard_with_best(2.0)
    assert float(g.settle(x, losses(1.5)).total) == 1.5 and float(x.mean()) == 1.0  # better than the best: kept
    g = guard_with_best(2.0)
    assert float(g.settle(x.clone(), losses(3.0)).total) == 2.0  # worse, as recorded: back to the best
    g = guard_with_best(2.0)
    y = x.clone()
    assert float(g.settle(y, losses(3.0), judge=lambda b: losses(4.0)).total) == 3.0 and float(y.mean()) == 1.0
    g = guard_with_best(2.0)
    assert float(g.settle(y, losses(3.0), judge=lambda b: losses(2.5)).total) == 2.5 and float(y.mean()) == 0.5


def test_a_tiled_pass_is_left_unshifted():
    from nstd.engine import StyleParams

    assert jitter.for_stage(StyleParams(jitter=8), (64, 64), "cpu", False).pad == 8
    assert jitter.for_stage(StyleParams(jitter=8), (64, 64), "cpu", True).pad == 0
    assert jitter.for_stage(StyleParams(jitter=8, seed=3), (64, 64), "cpu", False).shifts == shifts(8, 3)


def test_a_masks_weights_move_with_the_picture():
    """A region's weights are the mask under the same shift, at every layer's grid: a mask over
    the left half, seen one shift on, is the left half moved."""
    from nstd.engine.losses import StyleRegion
    from nstd.engine.regions import Weights

    mask = torch.zeros(1, 1, 32, 40)
    mask[..., :, :20] = 1.0
    j = Jitter(8, (32, 40), "cpu")

    class Objective:
        regions = [StyleRegion({}, Weights(mask.clone()), 0.5), StyleRegion({}, None, 0.5)]

    o = j.regions(Objective())
    assert o.regions[1].weights is None
    for step in range(jitter.SHIFTS):
        j.at(step)
        for hw in ((32, 40), (16, 20), (8, 10)):
            want = Weights(j.view(mask)).at(hw)
            assert torch.equal(o.regions[0].weight(hw), want)
    j.at(1)
    assert not torch.equal(o.regions[0].weight((32, 40)), mask)


def test_the_memory_model_counts_the_content_targets_of_every_shift():
    from nstd.engine.memory import feature_maps, predict_peak_bytes

    layers, content = ("conv1_1", "conv4_2", "conv5_1"), ("conv4_2",)
    kw = dict(layers=layers, content_layers=content)
    plain = predict_peak_bytes(512, 512, **kw)
    shifted = predict_peak_bytes(512, 512, jitter=8, **kw)
    one_target = sum(n for name, n in feature_maps(512, 512, "conv5_1") if name == "conv4_2") * 4
    assert shifted - plain >= (jitter.SHIFTS - 1) * one_target
    assert predict_peak_bytes(512, 512, tile=256, jitter=8, **kw) == predict_peak_bytes(512, 512, tile=256, **kw)
    assert predict_peak_bytes(512, 512, regions=2, jitter=8, **kw) > predict_peak_bytes(512, 512, regions=2, **kw)


def test_a_jittered_run_is_repeatable_and_differs_from_an_unshifted_one(engine, pair):
    from nstd.engine import StyleParams

    content, style = pair
    p = StyleParams(size=40, steps=6, frame_every=0)
    assert p.jitter == 8  # the default
    a = engine.stylize(content, [(style, 1.0)], p)
    b = engine.stylize(content, [(style, 1.0)], p)
    c = engine.stylize(content, [(style, 1.0)], StyleParams(size=40, steps=6, frame_every=0, jitter=0))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.e512 == c.e512  # the same passes: the shift costs none
    assert np.isfinite(a.losses["total"]) and a.losses["content"] > 0
