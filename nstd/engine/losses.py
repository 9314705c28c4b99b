"""Gatys et al. losses: content MSE, Gram-matrix style MSE, total variation. The other style
loss kinds (W2, sliced Wasserstein) are in styleloss.py, behind GramLoss's interface.

Each term is measured relative to its target's own magnitude (MSE / mean square of the target).
That makes the numbers independent of the weight source's activation scale (Caffe's VGG sees
0..255 pixels, torchvision's sees normalised 0..1), so the same content_weight / style_weight
give the same balance with either. The fixed units below put the contract's defaults
(content_weight=1, style_weight=1e4) at a well-stylised picture that keeps the content.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: style_weight x STYLE_UNIT weighs the relative style error against the relative content error;
#: 1e4 x 1e-3 = 10 was chosen by eye on tubingen + starry_night (1 is timid, 100 drowns the content).
STYLE_UNIT = 1e-3
#: tv_weight x TV_UNIT x mean squared neighbour difference (image in 0..1).
TV_UNIT = 100.0


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 at least: bf16 and fp16 become fp32, fp64 stays (finite-difference checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of (B, C, H, W) features, normalised by C*H*W, computed in fp32: (B, C, C)."""
    b, c, h, w = features.shape
    f = wide(features.reshape(b, c, h * w))
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


@dataclass
class Target:
    """A fixed target tensor and 1 / its mean square, for relative MSE."""

    value: torch.Tensor
    inv_scale: float

    @classmethod
    def of(cls, value: torch.Tensor) -> "Target":
        value = wide(value.detach())
        ms = float(value.pow(2).mean())
        return cls(value, 1.0 / ms if ms > 0 else 1.0)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (wide(x) - self.value).pow(2).mean() * self.inv_scale


def gram_sum(features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_p w_p f_p f_p^T of (B, C, H, W) features, in fp32: (B, C, C) (a tile's part of a Gram
    matrix); `weight` (1, 1, H, W): a region's mask at this layer (regions.py), None: all 1."""
    b, c, h, w = features.shape
    f = wide(features.reshape(b, c, h * w))
    return torch.bmm(weighted(f, weight), f.transpose(1, 2))


def weighted(f: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, C, N) flattened features times a (1, 1, H, W) weight map (N = H * W), or as they are."""
    return f if weight is None else f * weight.reshape(1, 1, -1).to(f.dtype)


def positions(features: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | int:
    """How many map positions a statistic counts: H * W, or the weights' sum."""
    return features.shape[-2] * features.shape[-1] if weight is None else wide(weight).sum()


class GramLoss:
    """The style loss kind `gram` (Gatys et al.): relative MSE of Gram matrices. The other kinds
    (styleloss.py) have the same shape: a layer's statistic of a picture's features (`stat`), its
    parts summed over positions for the tiled pass (`parts`, divided by `count`), a blend of
    several styles' statistics (`mix`), a style image's statistic that a target is made of
    (`style_stat`), the loss against a target (`target`), and the step it is taken at (`at`: the
    sliced kind cycles through sets of directions)."""

    name = "gram"
    summable = True  # the statistic is a sum over map positions: exact over tiles
    sets = 1  # one statistic for every step (the sliced kind cycles through sets of directions)

    def key(self) -> tuple:
        """What a cached target depends on beyond the style, its size and the network."""
        return ()

    def stat(self, layer: str, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The Gram matrix; with `weight`, over the region it weighs (each position by its weight,
        over the weights' sum: Gatys et al. 2017's guided Gram matrix)."""
        if weight is None:
            return gram(features)
        return gram_sum(features, weight) / self.count(features.shape[1], positions(features, weight))

    def style_stat(self, layer: str, features: torch.Tensor) -> torch.Tensor:
        return gram(features)

    def at(self, step: int) -> None:
        """The same statistic at every step."""

    def parts(self, layer: str, features: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return (gram_sum(features, weight),)

    def count(self, c: int, n):
        """What the parts' sum is divided by for `n` positions (the weights' sum, for a region)."""
        return c * n

    def pack(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return parts[0]

    def unpack(self, stat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (stat,)

    def mix(self, stats: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The weighted mean of the Gram matrices (weights sum to 1)."""
        return sum(g * w for g, w in zip(stats, weights))

    def target(self, layer: str, stat: torch.Tensor) -> Target:
        return Target.of(stat)


GRAM = GramLoss()


def blend(stats: list[dict], weights: list[float], kind=GRAM) -> dict:
    """Several style images' statistics blended by `kind` with weights normalised to sum 1
    (Gram matrices: their weighted mean)."""
    if not stats or len(stats) != len(weights):
        raise ValueError("need one weight per style image")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("style blend weights must be >= 0 and not all 0")
    return {layer: kind.mix([s[layer] for s in stats], [w / total for w in weights]) for layer in stats[0]}


def blend_grams(grams: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of several style images' Gram matrices (weights normalised to sum 1)."""
    return blend(grams, weights, GRAM)


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    dx = image[..., :, 1:] - image[..., :, :-1]
    dy = image[..., 1:, :] - image[..., :-1, :]
    return dx.pow(2).mean() + dy.pow(2).mean()


@dataclass
class Losses:
    """The weighted terms of one evaluation (tensors, so reading them is the caller's choice)."""

    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ("content", "style", "tv", "total")}


@dataclass
class StyleRegion:
    """One region's style targets (layer -> the kind's target), where they apply (regions.Weights:
    `at((h, w))` gives a layer's weights; None: everywhere) and the share of the style term its
    loss counts (the region's mean weight; 1 without masks)."""

    targets: dict
    weights: object = None
    share: float = 1.0

    def weight(self, layer_hw: tuple[int, int]) -> torch.Tensor | None:
        return self.weights.at(layer_hw) if self.weights is not None else None


class Objective:
    """content_weight * content + style_weight * STYLE_UNIT * style + tv_weight * TV_UNIT * tv.

    The style term is a sum over regions (regions.py), each its layers' mean loss times its share;
    without masks one region, everywhere, share 1."""

    def __init__(
        self,
        content_targets: dict[str, torch.Tensor],
        style_grams: dict[str, torch.Tensor],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
        kind=GRAM,
        regions: list[tuple[dict, object, float]] | None = None,
    ):
        """`content_targets`: feature maps, or targets with a `loss` (jitter.ShiftedTarget).
        `style_grams`: the target statistic of each style layer, of the loss kind `kind`
        (GramLoss here, styleloss.py's W2Loss or SlicedLoss). `regions` instead: (statistics,
        weights, share) per region (regions.py)."""
        self.kind = kind
        self.content = {k: v if hasattr(v, "loss") else Target.of(v) for k, v in content_targets.items()}
        if regions is None:
            regions = [(style_grams, None, 1.0)]
        self.regions = [StyleRegion({k: kind.target(k, v) for k, v in stats.items()}, weights, share)
                        for stats, weights, share in regions]
        self.style_layers: list[str] = list(dict.fromkeys(k for r in self.regions for k in r.targets))
        self.wc = content_weight
        self.ws = style_weight * STYLE_UNIT
        self.wtv = tv_weight * TV_UNIT

    @property
    def content_scale(self) -> float:
        """What each content layer's relative error is multiplied by in the total."""
        return self.wc / max(1, len(self.content))

    def content_term(self, features: dict[str, torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
        """The weighted content term from whole maps of the content layers."""
        return self.content_scale * sum((t.loss(features[k]) for k, t in self.content.items()), zero)

    @property
    def style(self) -> dict:
        """The first region's targets by layer (without masks, the only region's)."""
        return self.regions[0].targets if self.regions else {}

    def style_stats(self, features: dict[str, torch.Tensor]) -> list[dict]:
        """Each region's statistic of each of its layers, from whole maps."""
        return [{k: self.kind.stat(k, features[k], r.weight(features[k].shape[-2:])) for k in r.targets}
                for r in self.regions]

    def style_term(self, stats: list[dict] | dict, like: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted style term from each region's statistics (tiles.py computes them in
        parts); a dict alone: the only region's. No region at all: 0 on `like`'s device."""
        stats = [stats] if isinstance(stats, dict) else stats
        first = next((v for d in stats for v in d.values()), like)
        while isinstance(first, (tuple, list)):  # a kind's parts, or a region's sliced (values, weights, places)
            first = first[0]
        zero = first.new_zeros(()) if first is not None else torch.zeros(())
        total = zero
        for r, got in zip(self.regions, stats):
            total = total + r.share * sum((t.loss(got[k]) for k, t in r.targets.items()), zero) / max(1, len(r.targets))
        return self.ws * total

    def tv_term(self, image: torch.Tensor) -> torch.Tensor:
        return self.wtv * tv_loss(image) if self.wtv else image.new_zeros(())

    def __call__(self, features: dict[str, torch.Tensor], image: torch.Tensor) -> Losses:
        zero = image.new_zeros(())
        c = self.content_term(features, zero)
        s = self.style_term(self.style_stats(features)) if self.style_layers else zero
        v = self.tv_term(image)
        return Losses(c, s, v, c + s + v)
