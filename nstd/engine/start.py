"""A stage's start picture: the run's start (the content, the content in the styles' colours,
noise or an init image), the stage before's upsampled, or a checkpoint's; with fixed-seed grain
where the stage starts afresh."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import Palette, blend_stats, recolor
from nstd.engine.params import StyleParams
from nstd.engine.targets import StyleImage

if TYPE_CHECKING:
    from nstd.engine.run import Run

#: The long edge at which a style's colour statistics are taken: a palette needs no detail.
PALETTE_EDGE = 256


def color_matched(content_t: torch.Tensor, styles: Sequence[StyleImage], palette: Palette) -> torch.Tensor:
    """The content with the colour mean and covariance of the styles (as the run's colour mode
    sees them, blended by weight): the picture starts in the style's palette, so the steps go to
    strokes rather than to moving every pixel's colour (docs/quality.md, Passes). Under
    `preserve_color` the styles already wear the content's colours, and this is near the content."""
    place = content_t.device
    seen = [palette.style(images.to_tensor(images.resize_long_edge(s.image, PALETTE_EDGE)).to(place)) for s in styles]
    mu, cov = blend_stats(seen, [s.weight for s in styles])
    return recolor(content_t, mu.to(place), cov.to(place))


def initial(p: StyleParams, content_t: torch.Tensor, init_image: Image.Image | None,
            place: torch.device, styles: Sequence[StyleImage], palette: Palette) -> torch.Tensor:
    """The run's first picture on `place`, as `p.init` asks: the content, the content in the
    styles' colours, noise, or `init_image`."""
    if p.init == "content":
        return content_t.clone()
    if p.init == "color-matched":
        return color_matched(content_t, styles, palette)
    if p.init == "noise":
        g = torch.Generator().manual_seed(p.seed)
        return torch.rand(content_t.shape, generator=g).to(place)
    if init_image is None:
        raise ValueError(f"init {p.init!r} needs an init image")
    _, _, h, w = content_t.shape
    return images.to_tensor(init_image.resize((w, h), Image.Resampling.LANCZOS)).to(place)


def grain(shape: torch.Size, rms: float, seed: int, stage: int) -> torch.Tensor:
    """Fixed-seed Gaussian grain of `rms` 8-bit levels, the same for the same seed and stage.

    Why: in a flat region of a start picture (the content's sky, or any stage's upsampled picture)
    the fine scales hold no energy. With average pooling only conv1_1's Gram matrix pushes there
    (the pools average the rest away: docs/quality.md), and a Gram loss grows what it finds in
    proportion to what is there, so from almost nothing its fastest-growing frequencies win: a
    periodic grid. Grain in every direction and scale gives it strokes to shape instead."""
    g = torch.Generator().manual_seed(seed * 1009 + stage)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).mul_(rms / 255.0)


def start_picture(p: StyleParams, index: int, previous: torch.Tensor | None, content_t: torch.Tensor,
                  palette: Palette, run: "Run", place: torch.device, afresh: bool) -> torch.Tensor:
    """Stage `index`'s picture to optimise (a leaf that wants its gradient): `previous` (the stage
    before's, or a checkpoint's, perhaps at another size) brought to the content's size, or the
    run's first; with grain when the stage starts `afresh` (not mid-stage from a checkpoint)."""
    if previous is not None:
        x = previous.to(place, torch.float32)
        if x.shape[-2:] != content_t.shape[-2:]:
            x = torch.nn.functional.interpolate(x, size=content_t.shape[-2:], mode="bicubic", align_corners=False).clamp_(0, 1)
    else:
        x = palette.start(initial(p, content_t, run.init_image, place, run.styles, palette))
    if afresh and p.grain > 0:
        x = (x + grain(x.shape, p.grain, p.seed, index).to(place)).clamp_(0, 1)
    return x.contiguous().requires_grad_(True)
