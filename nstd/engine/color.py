"""Keeping the content's colours (Gatys et al. 2016, "Preserving Color in Neural Artistic Style
Transfer"), in the two ways the paper describes.

- `luminance`: the transfer runs on luminance only. Content and style are reduced to their luma
  (Y of YCbCr, ITU-R BT.601 full range, as JPEG and Pillow define it), the style's luma is matched
  to the content's mean and standard deviation, the picture is optimised as grey (Y in all three
  channels, so VGG sees what it was trained on), and its luma is recombined with the content's
  Cb and Cr. YCbCr rather than YIQ: it is what the result's JPEG/PNG readers and Pillow use, so
  "the chroma equals the content's" can be checked with Pillow's own conversion.
- `histogram`: before the run, the style image's colours are mapped so that their mean and
  covariance equal the content's: x' = C_c^(1/2) C_s^(-1/2) (x - mu_s) + mu_c, with the symmetric
  matrix square roots from an eigendecomposition. Symmetric roots (rather than Cholesky factors)
  give the one linear map of this form that does not depend on the order of the colour channels
  and rotates colours least; the paper's "image analogies" variant uses them too.

Images are (1, 3, H, W) tensors of RGB in 0..1.
"""
from __future__ import annotations

import torch

from nstd.engine.options import COLOR_MODES as MODES


#: BT.601 full range (JFIF): Y, Cb, Cr from R, G, B in 0..1 (Cb, Cr centred on 0.5).
_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_FROM_YCC = torch.linalg.inv(_TO_YCC)
_EPS = 1e-5


_ON_DEVICE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _constants(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(to YCbCr, from YCbCr, the chroma offset) on `like`'s device and dtype, copied there once:
    a copy from the host inside a GIF frame's conversion would stop the GPU every frame."""
    key = (like.device, like.dtype)
    if key not in _ON_DEVICE:
        offset = torch.tensor([0.0, 0.5, 0.5]).view(1, 3, 1, 1)
        _ON_DEVICE[key] = tuple(t.to(like) for t in (_TO_YCC, _FROM_YCC, offset))  # type: ignore[assignment]
    return _ON_DEVICE[key]


def to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    m, _, offset = _constants(rgb)
    return torch.einsum("ij,bjhw->bihw", m, rgb) + offset


def from_ycbcr(ycc: torch.Tensor) -> torch.Tensor:
    _, m, offset = _constants(ycc)
    return torch.einsum("ij,bjhw->bihw", m, ycc - offset).clamp(0, 1)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) luma."""
    return to_ycbcr(rgb)[:, :1]


def grey(y: torch.Tensor) -> torch.Tensor:
    """Luma as a 3-channel grey picture (what the VGG pass sees in luminance mode)."""
    return y.expand(-1, 3, -1, -1).contiguous()


def match_luma(style_y: torch.Tensor, content_y: torch.Tensor) -> torch.Tensor:
    """The style's luma with the content's mean and standard deviation."""
    s_mu, s_sd = style_y.mean(), style_y.std()
    c_mu, c_sd = content_y.mean(), content_y.std()
    return ((style_y - s_mu) * (c_sd / (s_sd + _EPS)) + c_mu).clamp(0, 1)


def with_content_chroma(y: torch.Tensor, content_rgb: torch.Tensor) -> torch.Tensor:
    """Luma `y` (1, 1, H, W) recombined with the content's Cb and Cr (resized to H x W if needed).

    A luma change moves R, G and B alike (the inverse matrix's first column is all ones), so the
    luma is first clamped per pixel to the range that keeps that pixel in gamut for its chroma:
    the result's chroma is then exactly the content's, with no per-channel clipping to skew it.
    """
    ycc = to_ycbcr(content_rgb)
    if ycc.shape[-2:] != y.shape[-2:]:
        ycc = torch.nn.functional.interpolate(ycc, size=y.shape[-2:], mode="bilinear", align_corners=False)
    chroma = ycc[:, 1:] - 0.5
    offsets = torch.einsum("ij,bjhw->bihw", _constants(y)[1][:, 1:], chroma)  # R, G, B minus the luma
    low, high = (-offsets).amax(dim=1, keepdim=True), (1 - offsets).amin(dim=1, keepdim=True)
    y = torch.maximum(torch.minimum(y, high), low)
    return from_ycbcr(torch.cat([y, ycc[:, 1:]], dim=1))


#: Pixels per float64 chunk in the colour statistics and the recolouring: a 4096 px print's
#: picture in float64 at once would be 400 MB per copy, outside the memory model.
_CHUNK = 1 << 20


def _stats(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour mean (3, 1) and covariance (3, 3), summed in float64 a chunk at a time."""
    x = rgb.reshape(3, -1)
    n = x.shape[1]
    total = torch.zeros(3, 1, dtype=torch.float64, device=x.device)
    second = torch.zeros(3, 3, dtype=torch.float64, device=x.device)
    for i in range(0, n, _CHUNK):
        part = x[:, i:i + _CHUNK].double()
        total += part.sum(dim=1, keepdim=True)
        second += part @ part.T
    mu = total / max(1, n)
    return mu, (second - n * (mu @ mu.T)) / max(1, n - 1)


def _sqrt_psd(c: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(c)
    # A floor for the inverse: a near-grey style's chroma is noise, and C_s^(-1/2) would blow it up
    # to the content's full colour range. Real pictures' smallest colour axis is far above it
    # (3e-4 to 4e-3 for the shipped images), so their match stays exact.
    vals = vals.clamp_min(max(1e-4, 1e-3 * float(vals.max()))) if inverse else vals.clamp_min(0)
    return vecs @ torch.diag(vals.rsqrt() if inverse else vals.sqrt()) @ vecs.T


def recolor(rgb: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """`rgb` with colour mean `mu` (3, 1) and covariance `cov` (3, 3), clamped to 0..1."""
    mu, cov = (t.to(rgb.device, torch.float64) for t in (mu, cov))
    mu_x, cov_x = _stats(rgb)
    a = _sqrt_psd(cov) @ _sqrt_psd(cov_x, inverse=True)
    b = mu - a @ mu_x
    x = rgb.reshape(3, -1)
    out = torch.empty_like(x)
    for i in range(0, x.shape[1], _CHUNK):
        out[:, i:i + _CHUNK] = (a @ x[:, i:i + _CHUNK].double() + b).to(x.dtype).clamp(0, 1)
    return out.reshape(rgb.shape)


def match_histogram(style_rgb: torch.Tensor, content_rgb: torch.Tensor) -> torch.Tensor:
    """The style picture with the content's colour mean and covariance (clamped to 0..1)."""
    return recolor(style_rgb, *_stats(content_rgb))


def blend_stats(pictures: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour mean and covariance of `pictures` mixed by `weights` (as if their pixels were
    pooled in those shares): a blend of styles has one palette, the blend of theirs."""
    total = float(sum(weights))
    mu = torch.zeros(3, 1, dtype=torch.float64)
    second = torch.zeros(3, 3, dtype=torch.float64)
    for rgb, w in zip(pictures, weights):
        m, c = _stats(rgb)
        mu += (w / total) * m.cpu()
        second += (w / total) * (c.cpu() + m.cpu() @ m.cpu().T)
    return mu, second - mu @ mu.T


def content_key(content_rgb: torch.Tensor) -> tuple:
    """What a histogram-matched style depends on, for the style-target cache's key."""
    mu, cov = _stats(content_rgb)
    return tuple(round(float(v), 4) for v in (*mu.flatten(), *cov.flatten()))


class Palette:
    """What a run's colour mode does to its pictures: the content and style VGG sees, the start
    picture, and what is shown (the result and the GIF frames)."""

    def __init__(self, mode: str, content_rgb: torch.Tensor, keep: torch.Tensor | None = None,
                 held: torch.Tensor | None = None):
        """`keep`: (1, 1, H, W) how much of each pixel stays the content (regions.py), blended
        into what is shown; `held`: the pixels kept whole (keep 1), also in what VGG sees."""
        if mode not in MODES:
            raise ValueError(f"unknown preserve_color {mode!r} (expected {', '.join(MODES)})")
        self.mode, self.content_rgb, self.keep, self.held = mode, content_rgb, keep, held
        self.content_y = luma(content_rgb) if mode == "luminance" else None

    def kept(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`x` with the content's pixels blended in by `mask`'s grey."""
        if mask is None:
            return x
        c = self.content_y if x.shape[1] == 1 and self.content_y is not None else self.content_rgb
        return torch.lerp(x, c.to(x.dtype), mask.to(x.dtype))

    def content(self) -> torch.Tensor:
        return grey(self.content_y) if self.content_y is not None else self.content_rgb

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """What VGG sees of the optimised picture: in luminance mode that is a 1-channel luma,
        seen as grey, so it stays grey however the gradients differ between channels."""
        x = self.kept(x, self.held)  # no gradient reaches a pixel kept whole; its neighbours see it
        return grey(x) if x.shape[1] == 1 else x

    def style(self, style_rgb: torch.Tensor) -> torch.Tensor:
        if self.mode == "luminance":
            return grey(match_luma(luma(style_rgb), self.content_y))
        if self.mode == "histogram":
            return match_histogram(style_rgb, self.content_rgb)
        return style_rgb

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """A start picture in the space the run optimises: in luminance mode its luma alone."""
        return luma(x) if self.content_y is not None and x.shape[1] == 3 else x

    def show(self, x: torch.Tensor) -> torch.Tensor:
        """The optimised picture as the user sees it: with the content's chroma in luminance mode."""
        x = self.kept(x, self.keep)  # a grey keep: the painted picture and the content, blended
        if self.content_y is None:
            return x
        return with_content_chroma(x if x.shape[1] == 1 else luma(x), self.content_rgb)

    def key(self) -> tuple:
        """For the style-target cache: an adjusted style depends on the content's colours."""
        return (self.mode,) if self.mode == "none" else (self.mode, content_key(self.content_rgb))
