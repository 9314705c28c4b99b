"""The held-out picture measures (nstd/engine/quality.py) on pictures whose answer is known, and
E512 counted for a staged run."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from PIL import Image

from nstd.engine import StyleParams, images
from nstd.engine.quality import Judge, clipped, moire, sliced_w2
from nstd.engine.schedule import Stage
from nstd.engine.params import E512_PIXELS, FORWARD_SHARE


def _grey(values: torch.Tensor) -> Image.Image:
    arr = values.clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(arr.numpy(), "L").convert("RGB")


def _noise(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 128 + 30 * torch.randn(h, w, generator=g)


def test_moire_is_high_for_stripes_and_none_for_flat():
    h = w = 64
    xx = torch.arange(w).float()[None, :].expand(h, w)
    stripes = _grey(128 + 60 * torch.cos(2 * math.pi * 0.45 * xx))
    flat = Image.new("RGB", (w, h), (90, 120, 200))
    noise = _grey(_noise(h, w))
    assert moire(flat) == 0.0
    assert moire(stripes) > 1000
    # noise has power in every direction: its bins sit near their ring's median
    assert moire(noise) < 20
    # stripes laid over noise stand out
    assert moire(_grey(_noise(h, w) + 20 * torch.cos(2 * math.pi * 0.45 * xx))) > 5 * moire(noise)
    # slow stripes (strokes) are below the band the measure looks at
    assert moire(_grey(_noise(h, w) + 20 * torch.cos(2 * math.pi * 0.05 * xx))) < 20


def test_moire_beyond_the_content_counts_a_grid_the_content_lacks_not_the_contents_own():
    h = w = 64
    xx = torch.arange(w).float()[None, :].expand(h, w)
    yy = torch.arange(h).float()[:, None].expand(h, w)
    grid = 20 * torch.cos(2 * math.pi * 0.3 * xx) * torch.cos(2 * math.pi * 0.3 * yy)
    plain = _grey(_noise(h, w))  # a content with no periodic detail
    windows = _grey(_noise(h, w) + grid)  # one with it (a facade's windows)
    result = _grey(_noise(h, w, seed=1) + grid)  # the same grid in the picture
    assert moire(result) > 5 * moire(plain)
    assert moire(result, plain) > 5 * moire(plain)  # a grid the content does not have: counted
    assert moire(result, windows) < 0.5 * moire(result)  # the content's own: not counted
    assert moire(windows, windows) <= 1.0  # each bin over itself
    assert moire(Image.new("RGB", (w, h), (9, 9, 9)), plain) == 0.0
    # the content at another size is brought to the picture's
    assert moire(result, windows.resize((128, 128), Image.Resampling.NEAREST)) < 0.5 * moire(result)


def test_clipped_counts_channels_at_the_ends():
    img = Image.new("RGB", (10, 10), (0, 128, 255))
    assert clipped(img) == pytest.approx(2 / 3)
    assert clipped(Image.new("RGB", (4, 4), (1, 128, 254))) == 0.0


def test_sliced_w2_is_zero_for_the_same_set_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 500, generator=g)
    d = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=0)
    assert sliced_w2(a, a, d) == 0.0
    assert sliced_w2(a, a[:, torch.randperm(500, generator=g)], d) == pytest.approx(0.0, abs=1e-10)
    near, far = sliced_w2(a, a + 0.1, d), sliced_w2(a, a + 1.0, d)
    assert 0 < near < far


def test_style_distance_is_zero_for_the_style_and_one_for_its_flat_mean(engine, pair):
    judge = Judge(engine.network)
    style = images.resize_long_edge(pair[1], 64)
    assert judge.style_distance(style, style) == pytest.approx(0.0, abs=1e-6)
    mean = tuple(int(round(v)) for v in images.to_tensor(style).mean(dim=(0, 2, 3)).mul(255).tolist())
    flat = Image.new("RGB", style.size, mean)
    assert judge.style_distance(flat, style) == pytest.approx(1.0, rel=1e-3)
    content = images.resize_long_edge(pair[0], 64)
    between = judge.style_distance(content, style)
    assert 0.0 < between
    # the content against itself keeps everything; a flat picture loses it
    assert judge.content_distance(content, content) == pytest.approx(0.0, abs=1e-6)
    assert judge.content_distance(flat.resize(content.size), content) > 0.5


def test_e512_counts_every_pass_of_a_staged_run(engine, pair):
    content, style = pair
    p = StyleParams(size=64, steps=3, stages=(Stage(32, 3), Stage(64, 2)),
                    frame_every=0)
    r = engine.stylize(content, [(style, 1.0)], p)
    assert [rec["steps"] for rec in r.stages] == [3, 2]
    expected = 0.0
    for rec in r.stages:
        w, h = rec["size"]
        stage = (rec["steps"] + FORWARD_SHARE) * w * h / E512_PIXELS  # steps, then the closing check
        assert rec["e512"] == pytest.approx(stage, abs=0.01)
        expected += stage
    assert r.e512 == pytest.approx(expected, abs=0.01)
    assert r.e512 > 0


def test_each_step_tells_the_passes_spent_so_far(engine, pair):
    content, style = pair
    seen = []
    r = engine.stylize(content, [(style, 1.0)], StyleParams(size=32, steps=3, frame_every=0),
                       progress=lambda info: seen.append(info.e512))
    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] <= r.e512
    w, h = images.fit_long_edge(content.size, 32)
    assert seen[-1] == pytest.approx(r.e512 - FORWARD_SHARE * w * h / E512_PIXELS, abs=0.001)


def test_grain_is_fixed_by_seed_and_stage_and_has_its_rms():
    from nstd.engine.start import grain as _grain

    a = _grain(torch.Size((1, 3, 64, 64)), 8.0, seed=0, stage=0)
    assert torch.equal(a, _grain(torch.Size((1, 3, 64, 64)), 8.0, seed=0, stage=0))
    assert not torch.equal(a, _grain(torch.Size((1, 3, 64, 64)), 8.0, seed=0, stage=1))
    assert not torch.equal(a, _grain(torch.Size((1, 3, 64, 64)), 8.0, seed=1, stage=0))
    assert float(a.std()) * 255 == pytest.approx(8.0, rel=0.05)


def test_grain_is_on_the_start_picture_and_zero_turns_it_off(engine, pair):
    content, style = pair
    p = StyleParams(size=48, steps=1, stages=1, frame_every=1, grain=8.0)
    r = engine.stylize(content, [(style, 1.0)], p)
    plain = engine.stylize(content, [(style, 1.0)], StyleParams(**{**p.__dict__, "grain": 0.0}))
    # the first frame is the start picture: the content with grain, or the content itself
    start, start0 = images.to_tensor(r.frames[0]), images.to_tensor(plain.frames[0])
    noise = (start - start0) * 255
    assert 7 < float(noise.std()) < 9  # 8 levels rms (a little is clamped at 0 and 255)
    assert float(noise.mean()) == pytest.approx(0.0, abs=1.0)


def test_the_colour_measure_is_zero_for_the_same_colours_and_one_for_none_in_common():
    from nstd.engine.quality import colour_distance, lab

    red = Image.new("RGB", (16, 16), (255, 0, 0))
    assert [round(v, 1) for v in lab(red)[0].tolist()] == [53.2, 80.1, 67.2]  # CIE L*a*b* of sRGB red
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert colour_distance(noise, noise) == 0.0
    assert colour_distance(red, Image.new("RGB", (16, 16), (0, 0, 255))) == 1.0
    assert 0.0 < colour_distance(noise, red) < 1.0


def _split(h: int, w: int, ramp: int = 8) -> Image.Image:
    """A mask white on the left, a linear ramp `ramp` px wide at the middle."""
    x = torch.arange(w, dtype=torch.float64) + 0.5
    row = ((w / 2 - x) / ramp + 0.5).clamp(0, 1) * 255
    return _grey(row.expand(h, w).clone())


def test_seam_is_one_for_an_even_texture_and_high_for_a_line_along_the_edge():
    from nstd.engine.quality import seam

    h, w = 64, 96
    mask = _split(h, w)
    even = _noise(h, w)
    assert 0.8 < seam(_grey(even), mask) < 1.25
    lined = even.clone()
    lined[:, w // 2 - 1] = 255  # a drawn line on the edge
    assert seam(_grey(lined), mask) > 2
    other = _noise(h, w, seed=1)  # two textures cross-faded: the band is smoother than either side
    m = images.to_tensor(mask)[0, 0].double()
    faded = m * even + (1 - m) * other
    assert seam(_grey(faded), mask) < 0.9
    with pytest.raises(ValueError, match="edge band"):
        seam(_grey(even), _grey(torch.full((h, w), 255.0)))


def test_inside_keeps_the_positions_a_mask_covers_whole(engine, pair):
    from nstd.engine.quality import inside

    mask = _split(64, 96)
    got = inside(mask, (8, 12))  # a map of 8 x 12: each position 8 px of the picture
    assert got[:, :5].all() and not got[:, 6:].any()  # the ramp (px 44-52) greys position 5
    assert inside(_grey(torch.zeros(16, 16)), (4, 4)).all()  # all black: the heaviest, everywhere
    content, style = pair
    judge = Judge(engine.network)
    whole = judge.style_distance(content, style)
    left = judge.style_distance(content, style, where=mask.resize(content.size))
    assert left > 0 and abs(left - whole) > 1e-4  # another set of positions, another distance
