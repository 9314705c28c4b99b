"""Keeping the content's colours: luminance-only transfer and colour (histogram) matching,
through the engine's pieces, the CLI and the daemon's job key."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness import Daemon
from nstd.engine import color, images


def ycc(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").convert("YCbCr")).astype(int)


@pytest.fixture(scope="module")
def small(pair):
    content, style = pair
    return images.resize_long_edge(content, 64), images.resize_long_edge(style, 64)


def test_ycbcr_is_pillows_and_round_trips(small):
    t = images.to_tensor(small[0])
    ours = (color.to_ycbcr(t)[0].permute(1, 2, 0).numpy() * 255)
    assert np.abs(ours - ycc(small[0])).max() <= 1.01  # Pillow rounds to 8 bits
    assert torch.allclose(color.from_ycbcr(color.to_ycbcr(t)), t, atol=1e-5)


def test_histogram_matching_gives_the_style_the_contents_mean_and_covariance(small):
    content, style = (images.to_tensor(i) for i in small)
    matched = color.match_histogram(style, content)
    mu_c, cov_c = color._stats(content)
    mu_m, cov_m = color._stats(matched)
    assert torch.allclose(mu_m, mu_c, atol=2e-4) and torch.allclose(cov_m, cov_c, atol=2e-4)
    mu_s, _ = color._stats(style)
    assert (mu_s - mu_c).abs().max() > 0.05  # it did move: the two pictures' colours differ


def test_a_color_matched_start_wears_the_blend_of_the_styles_colours(engine, small):
    """init: color-matched starts from the content in the styles' palette: the first frame has the
    colour mean and covariance of the styles' pixels pooled by weight, and the content's layout."""
    from nstd.engine.params import StyleParams
    from nstd.engine.start import color_matched
    from nstd.engine.targets import StyleImage
    content, style = small
    red = Image.new("RGB", (32, 32), (170, 90, 80))  # mild: the clamp to 0..1 would move the statistics
    blend = [StyleImage(style, 3.0), StyleImage(red, 1.0)]
    start = color_matched(images.to_tensor(content), blend, color.Palette("none", images.to_tensor(content)))
    mu, cov = color.blend_stats([images.to_tensor(style), images.to_tensor(red)], [3.0, 1.0])
    mu_x, cov_x = color._stats(start)
    assert torch.allclose(mu_x, mu, atol=3e-3) and torch.allclose(cov_x, cov, atol=3e-3)
    a, b = start.flatten() - start.mean(), images.to_tensor(content).flatten() - images.to_tensor(content).mean()
    assert float(a @ b / (a.norm() * b.norm())) > 0.6  # still the content's picture
    r = engine.stylize(content, [blend[0], blend[1]], StyleParams(size=48, steps=1, init="color-matched", grain=0,
                                                                  frame_every=1))
    first = images.to_tensor(r.frames[0].resize(content.size))
    off = lambda t: float((color._stats(t)[0] - mu).abs().max())
    assert off(first) < off(images.to_tensor(content)) / 3  # the run's first frame is that start


def test_blended_colour_statistics_are_the_pooled_pixels(small):
    a, b = (images.to_tensor(i) for i in small)
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    a, b = a[..., :h, :w], b[..., :h, :w]
    pooled = torch.cat([a, a, a, b], dim=-1)  # 3 parts a to 1 part b, as weights 3 and 1 say
    mu, cov = color.blend_stats([a, b], [3.0, 1.0])
    mu_p, cov_p = color._stats(pooled)
    assert torch.allclose(mu, mu_p, atol=1e-6) and torch.allclose(cov, cov_p, atol=2e-4)
    only, _ = color.blend_stats([a], [1.0])
    assert torch.allclose(only, color._stats(a)[0])


def test_luminance_matching_and_chroma_recombination(small):
    content, style = (images.to_tensor(i) for i in small)
    y = color.match_luma(color.luma(style), color.luma(content))
    assert abs(float(y.mean() - color.luma(content).mean())) < 1e-3
    assert abs(float(y.std() - color.luma(content).std())) < 1e-3
    out = color.with_content_chroma(color.luma(content), content)
    assert torch.allclose(out, content, atol=1e-4)  # its own luma with its own chroma: itself


def test_a_near_grey_style_does_not_turn_its_noise_into_colour(small):
    content = images.to_tensor(small[0])
    noise = torch.from_numpy(np.random.RandomState(0).randint(-1, 2, (1, 3, 48, 64))).float() / 255
    grey_style = (torch.full((1, 3, 48, 64), 0.5) + noise).clamp(0, 1)  # one 8-bit level of chroma noise
    matched = color.match_histogram(grey_style, content)
    chroma = color.to_ycbcr(matched)[0, 1:] * 255
    assert torch.isfinite(matched).all() and float(chroma.diff(dim=2).abs().mean()) < 8


def test_a_colour_adjusted_style_is_cached_per_content(engine, small):
    from nstd.engine import StyleImage, StyleParams, TargetCache

    cache, style = TargetCache(), StyleImage(small[1], 1.0, "digest")
    p = StyleParams(size=32, preserve_color="histogram")
    for content in (small[0], small[1], small[0]):
        palette = color.Palette("histogram", images.to_tensor(images.resize_long_edge(content, 32)))
        engine.style_targets([style], content.size, p, cache, palette)
    assert cache.counts() == {"hits": 1, "misses": 2}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="preserve_color 'sepia'"):
        color.Palette("sepia", torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("mode", ["luminance", "histogram"])
def test_cli_keeps_the_contents_colours(tmp_path, images_dir, mode):
    out, gif = tmp_path / "o.png", tmp_path / "o.gif"
    args = [sys.executable, "-m", "nstd.cli", "stylize", str(images_dir / "tubingen.jpg"),
            str(images_dir / "starry_night.jpg"), str(images_dir / "the_scream.jpg"), "--style-blend", "0.7", "0.3",
            "-o", str(out), "--size", "64", "--steps", "8", "--precision", "fp32", "--preserve-color", mode,
            "--gif", str(gif), "--gif-every", "4", "-q"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    content = images.resize_long_edge(images.open_image(images_dir / "tubingen.jpg"), 64)
    d = np.abs(ycc(Image.open(out)) - ycc(content))
    if mode == "luminance":
        # the chroma is the content's, pixel by pixel, up to the 8-bit round trip; the luma is stylized
        assert d[..., 1:].max() <= 1
        assert d[..., 0].mean() > 3
        with Image.open(gif) as g:  # the GIF frames show the kept colours too
            g.seek(g.n_frames - 1)
            frame = g.convert("RGB")
        assert np.abs(ycc(frame) - ycc(content.resize(frame.size)))[..., 1:].mean() < 3
    else:  # the result's colours are nearer the content's than a plain run's are
        plain = tmp_path / "plain.png"
        args[args.index(str(out))] = str(plain)
        args[args.index(mode)] = "none"
        assert subprocess.run(args, capture_output=True, timeout=180).returncode == 0
        mu_c, cov_c = color._stats(images.to_tensor(content))
        for_mode, for_plain = (color._stats(images.to_tensor(Image.open(p).convert("RGB"))) for p in (out, plain))
        far = lambda s: float((s[0] - mu_c).norm() + (s[1] - cov_c).norm())  # noqa: E731
        assert far(for_mode) < 0.7 * far(for_plain)


def test_the_job_key_through_the_daemon(tmp_path):
    d = Daemon(tmp_path, defaults={"size": 48, "steps": 4, "gif": {"every": 2}})
    d.start()
    try:
        d.drop("lum", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "preserve_color": "luminance"})
        d.drop("hist", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "preserve_color": "histogram"})
        d.drop("bad", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg", "preserve_color": "sepia"})
        d.wait_landed("lum", "hist", timeout=120)
        d.wait_quarantined("bad", timeout=60)
    finally:
        d.stop()
    for name in ("lum", "hist"):
        report = json.loads((d.outbox / name / "report.json").read_text())
        job = yaml.safe_load((d.outbox / name / "job.yaml").read_text())
        assert report["preserve_color"] == job["preserve_color"] == {"lum": "luminance", "hist": "histogram"}[name]
    content = images.resize_long_edge(images.open_image(d.outbox / "lum" / "inputs" / "hoovertowernight.jpg"), 48)
    chroma = np.abs(ycc(Image.open(d.outbox / "lum" / "lum.png")) - ycc(content))[..., 1:]
    assert chroma.max() <= 1
    assert "preserve_color: expected one of none, luminance, histogram" in d.error("bad")["message"]


def test_colour_statistics_and_recolouring_work_a_chunk_at_a_time(monkeypatch):
    """A print-size picture is never copied whole in float64: chunked, the figures are the same."""
    from nstd.engine import color

    torch.manual_seed(0)
    rgb = torch.rand(3, 37, 41) * torch.tensor([0.5, 0.8, 0.3]).view(3, 1, 1) + 0.1
    target = torch.rand(3, 9, 9)
    whole_mu, whole_cov = color._stats(rgb)
    whole = color.recolor(rgb, *color._stats(target))
    monkeypatch.setattr(color, "_CHUNK", 100)  # 16 chunks, the last one short
    mu, cov = color._stats(rgb)
    x = rgb.reshape(3, -1).double()
    assert torch.allclose(mu, x.mean(1, keepdim=True), atol=1e-12)
    assert torch.allclose(cov, torch.cov(x), atol=1e-12)
    assert torch.allclose(whole_mu, mu) and torch.allclose(whole_cov, cov)
    chunked = color.recolor(rgb, *color._stats(target))
    assert chunked.dtype == rgb.dtype and torch.allclose(chunked, whole, atol=1e-6)
    got_mu, got_cov = color._stats(chunked)
    want_mu, want_cov = color._stats(target)
    assert torch.allclose(got_mu, want_mu, atol=1e-3) and torch.allclose(got_cov, want_cov, atol=1e-3)
