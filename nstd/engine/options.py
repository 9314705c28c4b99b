"""The engine's names a user can write (layers, weights, colour modes, limits), importable without torch.

config.yaml, job files, `nstd validate` and `nstd status` check against these; importing torch
for them would cost `nstd status` two seconds.
"""
from __future__ import annotations

#: (block, convs in block) for VGG-19.
BLOCKS = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
#: Every conv layer in forward order: conv1_1 .. conv5_4.
CONV_LAYERS: tuple[str, ...] = tuple(f"conv{b}_{i}" for b, n in BLOCKS for i in range(1, n + 1))
DEFAULT_STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
DEFAULT_CONTENT_LAYERS = ("conv4_2",)
WEIGHT_SOURCES = ("vgg19-caffe", "torchvision")
#: preserve_color: keep the result's colours, its luminance only on the content's, or match histograms.
COLOR_MODES = ("none", "luminance", "histogram")
#: init: the start pictures a job names (anything else is an image file): the content, the content in the
#: styles' colours (nstd/engine/start.py), or noise.
NAMED_INITS = ("content", "color-matched", "noise")
#: pooling: VGG-19's 2x2 pools as Gatys (average), as trained (max), or the mean of both (mix: the
#: deeper layers see the fine scales max pooling passes, the average's smooth gradient stays).
POOLINGS = ("avg", "max", "mix")
#: style_loss: how a picture's style statistics are matched to the style's (nstd/engine/styleloss.py):
#: Gram matrices (Gatys), the Wasserstein-2 distance of Gaussian fits, or the sliced Wasserstein distance.
STYLE_LOSSES = ("gram", "w2", "sliced")
#: The largest input image, in pixels, unless limits.max_pixels says otherwise.
DEFAULT_MAX_PIXELS = 50_000_000
#: A mask (job key `mask` of a style, or `keep`) whose aspect ratio differs from the content's by more
#: than this fraction is refused: it was drawn for another picture (nstd/engine/regions.py).
MASK_RATIO_TOLERANCE = 0.01


def mask_ratio_off(content_size: tuple[int, int], mask_size: tuple[int, int]) -> float:
    """How far a mask's aspect ratio (width / height) is from the content's, as a fraction of the
    smaller (the same either way round), rounded so that exactly 1 % reads as 0.01."""
    (cw, ch), (mw, mh) = content_size, mask_size
    a, b = mw * ch, cw * mh  # the two ratios, cross-multiplied: integers, no rounding
    return round(max(a, b) / min(a, b) - 1.0, 9)


def mask_ratio_problem(key: str, name: str | None, mask: tuple[int, int], content: tuple[int, int]) -> str | None:
    """Why a mask (`key`: style[i].mask, keep, --mask; `name`: its file, if known) cannot go with
    the content: its aspect ratio is not the content's (within MASK_RATIO_TOLERANCE); None when it can."""
    if mask_ratio_off(content, mask) <= MASK_RATIO_TOLERANCE:
        return None
    (mw, mh), (cw, ch) = mask, content
    return (f"{key}: {f'{name} is ' if name else ''}{mw}x{mh} (ratio {mw / mh:.3f}) but the content is {cw}x{ch} "
            f"({cw / ch:.3f}); a mask must have the content's aspect ratio (within {MASK_RATIO_TOLERANCE:.0%})")
