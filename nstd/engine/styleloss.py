"""The style losses beyond Gram matrices (job key `style_loss`), behind losses.GramLoss's interface.

Gram matrices match the features' second moments only; Heitz et al. (CVPR 2021) show what that
misses. Two more kinds:

- `w2`: the Wasserstein-2 distance between Gaussian fits of the features (as crowsonkb's
  style-transfer-pytorch does): per layer the mean mu and the second moment M = E[f f^T], both
  means over positions, so a tiled pass sums them exactly. With Sigma = M - mu mu^T,
  W2^2 = |mu - mu_t|^2 + tr(Sigma) + tr(Sigma_t) - 2 tr((Sigma_t^1/2 Sigma Sigma_t^1/2)^1/2); the
  target's root by an eigendecomposition, once, the other by Newton-Schulz iterations (matrix
  products only: differentiable, no host read, capturable in a CUDA graph). A blend of styles
  is the mixture's first two moments: means and second moments averaged with the weights.
- `sliced`: the sliced Wasserstein distance: the features projected on K random unit directions
  per layer, sorted over the positions, against the style's sorted projections resampled to the
  picture's count (its quantile function, linearly interpolated). It matches the whole
  distribution, not two moments. A blend is, per direction, the 1-D Wasserstein barycenter: the
  styles' quantile functions averaged with the weights. A sort over the whole picture is not a
  sum over positions, so the tiled pass cannot run it (a style's target pass can: its
  projections are gathered over the tiles, then sorted). The directions are drawn from
  (seed, stage, layer) alone, SLICED_SETS sets of them a layer: a step matches one set, the next
  step the next (its global step number modulo the sets, as the jitter takes its shifts), so that
  the optimiser cannot meet a few fixed one-dimensional marginals and stop. The style's sorted
  projections are made for every set at set-up; a step's set is an index tensor changed in place
  (`at`), so a step is still a fixed sequence of kernels, deterministic and capturable, and the
  same in a resumed run.

Each loss is relative to the target's own magnitude, like Gram's: W2^2 over tr(M_t) (the squared
distance from the style's Gaussian to a point at 0), the sliced one over the mean square of the
target's quantiles, each times a unit (W2_UNIT, SLICED_UNIT) that gives the content picture's
distance to the style the size Gram's relative loss has there (measured on the four pairs of
bench/quality.py at 256 px), so that `style_weight` strikes a comparable balance for every kind.
"""
from __future__ import annotations

import zlib

import torch

from nstd.engine.losses import GRAM, positions, weighted
from nstd.engine.losses import wide as _wide
from nstd.engine.options import STYLE_LOSSES

#: Newton-Schulz iterations for the picture's matrix square root (see sqrtm_trace).
NS_ITERS = 20
#: eps * I (relative to the target's mean variance) is added to both covariances: the square
#: roots of a rank-deficient covariance (ReLU features) are then well defined and differentiable.
W2_EPS = 1e-4
#: Calibration of the relative W2 and sliced losses to Gram's (module docstring): Gram's relative
#: loss at the content picture over W2's was 1.41 to 2.22 (median 1.44), over sliced's 2.8 to 5.1
#: (median 3.1), layer means over the default style layers, 256 px, the four pairs.
W2_UNIT = 1.5
SLICED_UNIT = 3.0
#: Sliced directions per layer and set, as a fraction of its channels (K = C).
SLICED_RATIO = 1.0
#: Sets of directions per layer that the steps cycle through (docs/quality.md, "Style losses").
SLICED_SETS = 8
#: The style's quantile function is kept at this many points a direction at most (its sorted
#: projections resampled): every set's targets then take a few MiB a layer, whatever the size.
SLICED_QUANTILES = 4096


class StyleLossError(ValueError):
    """A style loss cannot run the way a job needs (sliced in tiles): the message says why and what can."""


def _flat(features: torch.Tensor) -> torch.Tensor:
    b, c, h, w = features.shape
    return _wide(features.reshape(b, c, h * w))


def sqrtm_trace(a: torch.Tensor, iters: int = NS_ITERS) -> torch.Tensor:
    """tr(a^1/2) of symmetric positive (semi)definite (B, C, C) matrices by coupled Newton-Schulz
    iterations on a / ||a||_F (its eigenvalues then lie in (0, 1], where they converge): matrix
    products only, so differentiable, free of host reads and capturable."""
    norm = a.flatten(-2).norm(dim=-1).clamp_min(1e-30)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    y, z = a / norm, eye
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return y.diagonal(dim1=-2, dim2=-1).sum(-1) * norm[..., 0, 0].sqrt()


class W2Target:
    """W2^2 from the picture's Gaussian fit (mu, M) to the style's, relative to tr(M_t)."""

    def __init__(self, mu: torch.Tensor, m: torch.Tensor):
        mu, m = _wide(mu.detach()), _wide(m.detach())
        sigma = m - mu[..., :, None] * mu[..., None, :]
        sigma = (sigma + sigma.transpose(-1, -2)) / 2
        c = sigma.shape[-1]
        tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
        self.eps = W2_EPS * max(float(tr.mean()) / c, 1e-12)
        eye = torch.eye(c, dtype=sigma.dtype, device=sigma.device)
        vals, vecs = torch.linalg.eigh((sigma + self.eps * eye).double())
        root = (vecs * vals.clamp_min(0).sqrt()[..., None, :]) @ vecs.transpose(-1, -2)
        self.mu, self.root, self.eye = mu, root.to(sigma.dtype), eye
        self.tr_t = tr + self.eps * c
        total = float(m.diagonal(dim1=-2, dim2=-1).sum(-1).mean())
        self.inv_scale = W2_UNIT / total if total > 0 else W2_UNIT

    def loss(self, stat: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mu, m = (_wide(t) for t in stat)
        sigma = m - mu[..., :, None] * mu[..., None, :] + self.eps * self.eye
        a = self.root @ sigma @ self.root
        a = (a + a.transpose(-1, -2)) / 2
        d = ((mu - self.mu).pow(2).sum(-1) + sigma.diagonal(dim1=-2, dim2=-1).sum(-1) + self.tr_t
             - 2 * sqrtm_trace(a))
        return d.mean() * self.inv_scale


class W2Loss:
    """The `w2` kind: per layer (mu, M), means over positions of f and f f^T (summable)."""

    name = "w2"
    summable = True
    sets = 1

    def key(self) -> tuple:
        return ("w2",)

    def parts(self, layer: str, features: torch.Tensor,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over positions of f and f f^T (each position by its region's `weight`)."""
        f = _flat(features)
        fw = weighted(f, weight)
        return fw.sum(-1), torch.bmm(fw, f.transpose(1, 2))

    def count(self, c: int, n):
        return n

    def stat(self, layer: str, features: torch.Tensor,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = positions(features, weight)
        return tuple(t / n for t in self.parts(layer, features, weight))

    def style_stat(self, layer: str, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stat(layer, features)

    def at(self, step: int) -> None:
        """The same statistic at every step."""

    def pack(self, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(parts)

    def unpack(self, stat: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(stat)

    def mix(self, stats: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple:
        """The mixture's first two moments: means and second moments averaged with the weights."""
        return tuple(sum(s[i] * w for s, w in zip(stats, weights)) for i in range(2))

    def target(self, layer: str, stat: tuple[torch.Tensor, torch.Tensor]) -> W2Target:
        return W2Target(*stat)


def grid(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where n evenly spaced quantiles, at (i + 0.5) / n, fall among m sorted values: the lower
    and upper neighbours' indices and the weight of the upper one (float32)."""
    pos = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * m / n - 0.5
    lo = pos.floor().clamp(0, m - 1).long()
    hi = (lo + 1).clamp(max=m - 1)
    return lo, hi, (pos - lo.float()).clamp(0, 1)


def quantiles(sorted_rows: torch.Tensor, n: int, at: tuple | None = None) -> torch.Tensor:
    """n evenly spaced quantiles of each sorted row (the last dimension; linear interpolation of
    the quantile function at (i + 0.5) / n); `at`: their `grid`, when made before."""
    m = sorted_rows.shape[-1]
    if m == n:
        return sorted_rows
    lo, hi, frac = at if at is not None else grid(m, n, sorted_rows.device)
    frac = frac.to(sorted_rows.dtype)
    return sorted_rows[..., lo] * (1 - frac) + sorted_rows[..., hi] * frac


def at_fractions(sorted_rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each sorted row's quantile function at fractions `u` (B, K, n) in (0, 1), linearly
    interpolated as `quantiles` does (u = (i + 0.5) / n gives its values)."""
    m = sorted_rows.shape[-1]
    pos = u * m - 0.5
    lo_f = pos.floor().clamp(0, m - 1)
    lo = lo_f.long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo_f).clamp(0, 1).to(sorted_rows.dtype)
    rows = sorted_rows.expand(u.shape[0], -1, -1)
    return torch.gather(rows, -1, lo) * (1 - frac) + torch.gather(rows, -1, hi) * frac


def kept(sorted_rows: torch.Tensor) -> torch.Tensor:
    """A style's sorted projections as a target keeps them: at most SLICED_QUANTILES quantiles."""
    return quantiles(sorted_rows, SLICED_QUANTILES) if sorted_rows.shape[-1] > SLICED_QUANTILES else sorted_rows


class SlicedTarget:
    """Mean squared difference of sorted projections, relative to the target's mean square; the
    style's quantiles of every set (S, B, K, M), the current one selected by `index`."""

    def __init__(self, sorted_proj: torch.Tensor, index: torch.Tensor):
        self.values = _wide(sorted_proj.detach())
        ms = float(self.values.pow(2).mean())
        self.inv_scale = SLICED_UNIT / ms if ms > 0 else SLICED_UNIT
        self.index = index
        self._grids: dict[int, tuple] = {}

    @property
    def value(self) -> torch.Tensor:
        """The current set's quantiles (B, K, M)."""
        return self.values.index_select(0, self.index)[0]

    def at(self, n: int) -> torch.Tensor:
        """The current set's quantiles resampled to n positions, made in each step (a picture's
        worth of memory for a moment, not kept for every set); where they fall among the kept
        ones is made once per picture size (in an eager step, never within a captured one: a
        stage's first steps are eager)."""
        m = self.values.shape[-1]
        if m != n and n not in self._grids:
            self._grids[n] = grid(m, n, self.values.device)
        return quantiles(self.value, n, self._grids.get(n))

    def loss(self, stat) -> torch.Tensor:
        """Against the picture's sorted projections on the current set; a region's (sorted
        projections, their weights, where each sits in the weighted distribution) is matched at
        those quantiles, weighted."""
        if not isinstance(stat, tuple):
            return (_wide(stat) - self.at(stat.shape[-1])).pow(2).mean() * self.inv_scale
        values, w, mid = stat
        goal = at_fractions(self.value, mid)
        per_row = (w * (_wide(values) - goal).pow(2)).sum(-1) / w.sum(-1).clamp_min(1e-12)
        return per_row.mean() * self.inv_scale


class SlicedLoss:
    """The `sliced` kind: per layer the features' projections on K fixed random unit directions
    (the step's set of `sets`), sorted over the positions. Not summable (module docstring)."""

    name = "sliced"
    summable = False

    def __init__(self, seed: int = 0, stage: int = 0, ratio: float | None = None, sets: int | None = None):
        self.seed, self.stage, self.ratio = seed, stage, SLICED_RATIO if ratio is None else ratio
        self.sets = max(1, SLICED_SETS if sets is None else int(sets))
        self.current = 0
        self._dirs: dict[tuple, torch.Tensor] = {}
        self._index: dict[str, torch.Tensor] = {}

    def key(self) -> tuple:
        return ("sliced", self.seed, self.stage, self.ratio, self.sets)

    def at(self, step: int) -> None:
        """Take the set of global step `step`, in place (a captured graph reads it)."""
        self.current = step % self.sets
        for index in self._index.values():
            index.fill_(self.current)

    def index(self, device: torch.device) -> torch.Tensor:
        """The current set, as a one-element tensor on `device` (changed in place by `at`)."""
        key = str(device)
        if key not in self._index:
            self._index[key] = torch.full((1,), self.current, dtype=torch.long, device=device)
        return self._index[key]

    def directions(self, layer: str, c: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(sets, C, K) unit directions drawn on the CPU from (seed, stage, layer, set) alone (set 0
        from (seed, stage, layer), as when there was one set)."""
        key = (layer, c, str(device), dtype)
        if key not in self._dirs:
            each = []
            for i in range(self.sets):
                name = f"{self.seed}/{self.stage}/{layer}" + (f"/{i}" if i else "")
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                d = torch.randn(c, max(1, round(c * self.ratio)), generator=g, dtype=torch.float64)
                each.append(d / d.norm(dim=0, keepdim=True))
            self._dirs[key] = torch.stack(each).to(device=device, dtype=dtype)
        return self._dirs[key]

    def parts(self, layer: str, features: torch.Tensor) -> tuple[torch.Tensor]:
        """The projections on every set (sets, B, K, positions), unsorted: a tiled target pass
        gathers them."""
        f = _flat(features)
        return (self.directions(layer, f.shape[1], f.device, f.dtype).transpose(1, 2).unsqueeze(1) @ f.unsqueeze(0),)

    def style_stat(self, layer: str, features: torch.Tensor) -> torch.Tensor:
        """A style's statistic, a target's: on every set its projections' quantiles (`kept`), one
        set projected and sorted at a time."""
        f = _flat(features)
        return self.pack(((d.T @ f for d in self.directions(layer, f.shape[1], f.device, f.dtype)),))

    def stat(self, layer: str, features: torch.Tensor, weight: torch.Tensor | None = None):
        """The picture's sorted projections on the current set; with a region's `weight`, also each
        one's weight and its place in the weighted distribution (the midpoint of its step of the
        cumulative weights), so the target's quantile function is read where the region's
        distribution puts it."""
        f = _flat(features)
        dirs = self.directions(layer, f.shape[1], f.device, f.dtype).index_select(0, self.index(f.device))[0]
        proj = dirs.T @ f
        if weight is None:
            return proj.sort(dim=-1).values
        values, order = proj.sort(dim=-1)
        w = torch.gather(_wide(weight).reshape(1, 1, -1).expand(proj.shape[0], proj.shape[1], -1), -1, order)
        cum = w.cumsum(-1)
        mid = (cum - w / 2) / cum[..., -1:].clamp_min(1e-12)
        return values, w, mid

    def pack(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The projections of every set (gathered over tiles, or made one at a time), sorted and
        kept (`kept`) a set at a time."""
        return torch.stack([kept(p.sort(dim=-1).values) for p in parts[0]])

    def unpack(self, stat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (stat,)

    def mix(self, stats: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """Per direction the 1-D Wasserstein barycenter: the quantile functions (resampled to the
        most positions of any) averaged with the weights; one style's, as it is (no copy)."""
        if len(stats) == 1:
            return stats[0]
        n = max(s.shape[-1] for s in stats)
        return sum(quantiles(s, n) * w for s, w in zip(stats, weights))

    def target(self, layer: str, stat: torch.Tensor) -> SlicedTarget:
        """From a style's statistic (`style_stat`: every set's)."""
        return SlicedTarget(stat, self.index(stat.device))


def style_kind(name: str, seed: int = 0, stage: int = 0, tiled: bool = False):
    """The loss kind `name` (options.STYLE_LOSSES) for stage `stage` of a run seeded `seed`;
    `tiled`: for a tiled pass, which a kind that is not summable refuses (StyleLossError)."""
    kinds = {"gram": lambda: GRAM, "w2": W2Loss, "sliced": lambda: SlicedLoss(seed, stage)}
    if name not in kinds:
        raise ValueError(f"unknown style_loss {name!r} (expected one of {', '.join(STYLE_LOSSES)})")
    kind = kinds[name]()
    if tiled and not kind.summable:
        raise StyleLossError(f"style_loss: {name} cannot run in tiles (its sort is over the whole picture); "
                             "style_loss gram or w2 can")
    return kind


def refuse_tiles(size: tuple[int, int], budget: str, need: str, tiled_fits: bool) -> StyleLossError:
    """The clear refusal of a sliced job whose untiled pass does not fit the budget."""
    w, h = size
    return StyleLossError(
        f"style_loss: sliced cannot run in tiles (its sort is over the whole picture) and its untiled pass at "
        f"{w}x{h} needs {need}, over the memory budget of {budget}; style_loss gram or w2 "
        + ("can run this size tiled" if tiled_fits else "run big pictures tiled") + ", or ask for a smaller size")

