"""Held-out measures of a finished picture: how well it took the style, how much of the content it
kept, periodic artefacts (moiré), clipped pixels.

They judge a picture from outside the optimisation, so that no method is scored by its own loss:
the network is VGG-19 with *max* pooling (the engine optimises through average pooling by
default), the style statistic is the sliced Wasserstein-2 distance over all 16 conv layers (the
engine matches Gram matrices of five), seen at 0.75x the result's scale. bench/quality.py runs
them over a frozen set of pairs.
"""
from __future__ import annotations

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import luma
from nstd.engine.options import CONV_LAYERS
from nstd.engine.styleloss import quantiles as _quantiles

#: C_held's layers: below conv2_1 a feature is little more than the pixels; conv4_2, the engine's
#: content layer, is one of five here.
CONTENT_LAYERS = ("conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1")
#: S_held sees both pictures at this fraction of the result's scale (another view than the loss's).
STYLE_VIEW = 0.75
DIRECTIONS = 128
#: Moiré: frequencies above this fraction of Nyquist count (below it lie the strokes).
MOIRE_FROM = 0.2


@torch.no_grad()
def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 distance (squared) between the feature sets a (C, Na) and b (C, Nb),
    projected on `directions` (C, D): the quantiles of each projection compared at the smaller
    count of points."""
    pa = (directions.T @ a).sort(dim=1).values  # (D, Na)
    pb = (directions.T @ b).sort(dim=1).values
    n = min(pa.shape[1], pb.shape[1])
    pa, pb = _quantiles(pa, n), _quantiles(pb, n)
    return float((pa - pb).pow(2).mean())


class Judge:
    """The held-out network (VGG-19, max pooling, all 16 convs) and fixed random directions:
    one per process, shared by every picture it judges."""

    def __init__(self, network, seed: int = 1234):
        self.extractor = network.extractor(CONV_LAYERS, "max")
        self.device = network.device
        g = torch.Generator().manual_seed(seed)
        self.directions = {}
        for name in CONV_LAYERS:
            c = network.convs[name].out_channels
            d = torch.randn(c, DIRECTIONS, generator=g)
            self.directions[name] = (d / d.norm(dim=0, keepdim=True)).to(self.device)
        self._style_cache: dict[tuple, dict] = {}

    @torch.no_grad()
    def features(self, img: Image.Image, layers=CONV_LAYERS) -> dict[str, torch.Tensor]:
        x = images.to_tensor(img).to(self.device)
        feats = self.extractor(x)
        return {k: feats[k][0].flatten(1).float() for k in layers}

    def style_distance(self, result: Image.Image, style: Image.Image, style_scale: float = 1.0,
                       where: Image.Image | None = None) -> float:
        """S_held: per layer the sliced W2 from the result's features to the style's, over the
        same distance from a flat picture of the style's mean colour; the mean over layers. The
        style is seen at the engine's size rule (its long edge = the result's x style_scale), both
        at STYLE_VIEW of that. `where` (a mask of the result's aspect ratio): only the map
        positions inside it count (`inside`), the result still seen whole."""
        edge = max(16, round(max(result.size) * STYLE_VIEW))
        s_edge = max(16, round(max(result.size) * style_scale * STYLE_VIEW))
        ref = self._style_reference(style, s_edge, result.size, edge)
        seen = images.resize_long_edge(result, edge)
        if where is None:
            got = self.features(seen)
        else:
            with torch.no_grad():
                maps = self.extractor(images.to_tensor(seen).to(self.device))
            got = {k: v[0].flatten(1)[:, inside(where, v.shape[-2:]).flatten().to(v.device)].float()
                   for k, v in maps.items()}
        ratios = [sliced_w2(got[k], ref["style"][k], self.directions[k]) / ref["flat"][k] for k in CONV_LAYERS]
        return sum(ratios) / len(ratios)

    def _style_reference(self, style: Image.Image, s_edge: int, size: tuple[int, int], edge: int) -> dict:
        key = (id(style), s_edge, size, edge)
        if key not in self._style_cache:
            feats = self.features(images.resize_long_edge(style, s_edge))
            mean = tuple(int(round(v)) for v in images.to_tensor(style).mean(dim=(0, 2, 3)).mul(255).tolist())
            flat = self.features(Image.new("RGB", images.fit_long_edge(size, edge), mean))
            self._style_cache[key] = {
                "style": feats,
                "flat": {k: max(sliced_w2(flat[k], feats[k], self.directions[k]), 1e-12) for k in CONV_LAYERS},
            }
        return self._style_cache[key]

    def content_distance(self, result: Image.Image, content: Image.Image) -> float:
        """C_held: mean over CONTENT_LAYERS of |F(result) - F(content)|^2 / |F(content)|^2, the
        content resized to the result's size."""
        ref = self.features(content.resize(result.size, Image.Resampling.LANCZOS), CONTENT_LAYERS)
        got = self.features(result, CONTENT_LAYERS)
        vals = [float((got[k] - ref[k]).pow(2).sum() / ref[k].pow(2).sum().clamp_min(1e-12)) for k in CONTENT_LAYERS]
        return sum(vals) / len(vals)


#: A map position is inside a region when the mask, area-averaged to the map's grid, is at least this.
INSIDE = 0.99


def inside(mask: Image.Image, hw) -> torch.Tensor:
    """(h, w) bool: the positions of an h x w map that the mask covers whole (its grey area-averaged
    to the grid at least INSIDE); at least one, the mask's heaviest, whatever the mask."""
    m = images.to_tensor(mask.convert("L").convert("RGB"))[:, :1]
    m = torch.nn.functional.adaptive_avg_pool2d(m, tuple(int(v) for v in hw))[0, 0]
    out = m >= INSIDE
    if not bool(out.any()):
        out = m >= m.max()
    return out


def seam(img: Image.Image, mask: Image.Image, border: int = 4) -> float:
    """A seam along a soft mask's edge: the luminance's gradient energy (squared differences to the
    right and below) in the band where the mask is between a quarter and three quarters, over the
    same on both sides' interiors (grey under 0.01 or over 0.99), each side weighing the same. 1:
    the edge is as busy as the regions; a drawn line or a hard cut is more."""
    y = luminance(img).double()
    gx = torch.zeros_like(y)
    gy = torch.zeros_like(y)
    gx[:, :-1] = (y[:, 1:] - y[:, :-1]).pow(2)
    gy[:-1, :] = (y[1:, :] - y[:-1, :]).pow(2)
    energy = (gx + gy)[border:-border - 1, border:-border - 1]
    m = images.to_tensor(mask.convert("L").resize(img.size, Image.Resampling.BILINEAR).convert("RGB"))[0, 0].double()
    m = m[border:-border - 1, border:-border - 1]
    band, ones, zeros = (m >= 0.25) & (m <= 0.75), m >= 0.99, m <= 0.01
    if not (bool(band.any()) and bool(ones.any()) and bool(zeros.any())):
        raise ValueError("seam: the mask needs an edge band and both interiors")
    interiors = 0.5 * (float(energy[ones].mean()) + float(energy[zeros].mean()))
    return float(energy[band].mean()) / max(interiors, 1e-12)


def luminance(img: Image.Image) -> torch.Tensor:
    """(H, W) float luma in 0..1 (BT.601, as the colour modes use)."""
    return luma(images.to_tensor(img))[0, 0]


def _periodicity(img: Image.Image) -> torch.Tensor:
    """Each luminance power-spectrum bin above MOIRE_FROM of Nyquist (Hann-windowed) over the
    median power at its radius, as an (H, W) map (0 outside those bins)."""
    y = luminance(img).double()
    h, w = y.shape
    y = y - y.mean()
    win = torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None] * torch.hann_window(w, periodic=False, dtype=torch.float64)[None, :]
    power = torch.fft.fftshift(torch.fft.fft2(y * win)).abs().pow(2)
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, dtype=torch.float64))[:, None] / 0.5
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, dtype=torch.float64))[None, :] / 0.5
    radius = (fx.pow(2) + fy.pow(2)).sqrt()  # 1 = Nyquist along an axis
    rings = (radius * min(h, w) / 2).round().long()
    keep = (radius > MOIRE_FROM) & (radius <= 1.0)
    out = torch.zeros_like(power)
    for r in rings[keep].unique().tolist():
        ring = (rings == r) & keep
        med = power[ring].median()
        if med > 0:
            out[ring] = power[ring] / med
    return out


def moire(img: Image.Image, content: Image.Image | None = None) -> float:
    """Periodic high-frequency artefacts: the 99.9th percentile, over the luminance power
    spectrum's bins above MOIRE_FROM of Nyquist, of each bin's power over the median power at its
    radius. A stroke spreads its power over all directions of a ring; a periodic grid puts it in a
    few bins, far above their ring's median. A Hann window keeps the picture's edges out.

    With `content`: the periodicity the content does not have. Each bin's figure is divided by the
    content's own at that bin (the content at the picture's size; at least 1), so a picture that
    keeps the content's windows, roofs or cables is not counted for them, while a grid where the
    content is flat is."""
    ratios = _periodicity(img)
    if not bool((ratios > 0).any()):
        return 0.0
    if content is not None:
        own = _periodicity(content.convert("RGB").resize(img.size, Image.Resampling.LANCZOS))
        ratios = torch.where(ratios > 0, ratios / own.clamp(min=1.0), ratios)
    return float(torch.quantile(ratios[ratios > 0].float(), 0.999))


def clipped(img: Image.Image) -> float:
    """The fraction of pixel channels at 0 or 255."""
    t = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return float(((t == 0) | (t == 255)).float().mean())


#: The colour measure's bins along L*, a*, b* (and their ranges): a 3-D histogram of 8 x 8 x 8.
LAB_BINS = 8
LAB_RANGES = ((0.0, 100.0), (-90.0, 90.0), (-90.0, 90.0))


def lab(img: Image.Image) -> torch.Tensor:
    """(N, 3) CIE L*a*b* (D65) of every pixel, from sRGB."""
    rgb = images.to_tensor(img.convert("RGB"))[0].double().reshape(3, -1).T
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).pow(2.4))
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
    xyz = lin @ m.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.pow(1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_histogram(img: Image.Image) -> torch.Tensor:
    """The picture's colours as a normalised LAB_BINS^3 histogram over L*a*b* (values out of
    range count in the edge bins)."""
    values = lab(img)
    idx = [((values[:, c] - lo) / (hi - lo) * LAB_BINS).long().clamp(0, LAB_BINS - 1)
           for c, (lo, hi) in enumerate(LAB_RANGES)]
    flat = (idx[0] * LAB_BINS + idx[1]) * LAB_BINS + idx[2]
    hist = torch.bincount(flat, minlength=LAB_BINS ** 3).double()
    return hist / hist.sum()


def colour_distance(result: Image.Image, style: Image.Image) -> float:
    """How far the result's colours are from the style's: the total variation distance between
    their L*a*b* histograms (0 = the same colour distribution, 1 = no colour in common)."""
    return float(0.5 * (lab_histogram(result) - lab_histogram(style)).abs().sum())
