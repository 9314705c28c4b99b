"""A stage's start picture: the run's start (content, noise or an init image), the stage before's
upsampled, or a checkpoint's; with fixed-seed grain where the stage starts afresh."""
from __future__ import annotations

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import Palette
from nstd.engine.params import StyleParams


def initial(p: StyleParams, content_t: torch.Tensor, init_image: Image.Image | None,
            place: torch.device) -> torch.Tensor:
    """The run's first picture on `place`, as `p.init` asks: the content, noise, or `init_image`."""
    if p.init == "content":
        return content_t.clone()
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
                  palette: Palette, init_image: Image.Image | None, place: torch.device,
                  afresh: bool) -> torch.Tensor:
    """Stage `index`'s picture to optimise (a leaf that wants its gradient): `previous` (the stage
    before's, or a checkpoint's, perhaps at another size) brought to the content's size, or the
    run's first; with grain when the stage starts `afresh` (not mid-stage from a checkpoint)."""
    if previous is not None:
        x = previous.to(place, torch.float32)
        if x.shape[-2:] != content_t.shape[-2:]:
            x = torch.nn.functional.interpolate(x, size=content_t.shape[-2:], mode="bicubic", align_corners=False).clamp_(0, 1)
    else:
        x = palette.start(initial(p, content_t, init_image, place))
    if afresh and p.grain > 0:
        x = (x + grain(x.shape, p.grain, p.seed, index).to(place)).clamp_(0, 1)
    return x.contiguous().requires_grad_(True)
