"""Predicting a job's peak memory before it runs, so the daemon can fit it in a VRAM budget.

The model counts what a stylization step keeps alive at once: the frozen weights in use, the
activations autograd saves for the backward pass, the largest transient buffers of the backward
pass, the image with its gradient, the optimiser's state (L-BFGS keeps 2 x history image-sized
vectors), and the content and style targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nstd.engine.jitter import SHIFTS
from nstd.engine.styleloss import NS_ITERS, SLICED_QUANTILES, SLICED_SETS
from nstd.engine.vgg import CHANNELS, CONV_LAYERS, CONV_SHAPES, layer_index

#: On CUDA, what the allocator hands out beyond the tensors above: cuDNN's convolution workspaces
#: and the allocator's rounding. On an H100 (torch 2.11, fp32) the model without it predicted 202 MiB
#: where max_memory_allocated measured 276 at 256 px; at 512 px and up the model already
#: over-predicts (641/594, 2396/1801, 9416/8065). A fixed reserve covers the small sizes.
CUDA_RESERVE_BYTES = 128 * 2**20
#: Backward-pass transients, in multiples of the largest feature map (its grad, the next grad,
#: and the conv's temporary); fitted on the CPU against autograd's saved-tensor bytes.
_TRANSIENT_MAPS = 3
_FP32 = 4


def feature_maps(height: int, width: int, deepest: str) -> list[tuple[str, int]]:
    """(name, elements) of every post-ReLU map up to `deepest`, plus the pooled maps between blocks."""
    last = layer_index(deepest)
    maps, h, w, block = [], height, width, 1
    for name in CONV_LAYERS[: last + 1]:
        b = int(name[4])
        if b != block:
            h, w, block = h // 2, w // 2, b
            maps.append((f"pool{block - 1}", CHANNELS[block - 1] * h * w))
        maps.append((name, CHANNELS[b] * h * w))
    return maps


#: The reach of each deepest layer's tiles (tiles.py), input px, on the deepest map's grid:
#: Extractor.reach rounded up to 2 ** pools (kept here so the model needs no network).
def _grid_and_halo(deepest: str) -> tuple[int, int]:
    reach, scale = 0, 1
    block = 1
    for name in CONV_LAYERS[: layer_index(deepest) + 1]:
        b = int(name[4])
        if b != block:
            reach += scale
            scale *= 2
            block = b
        reach += scale
    return scale, -(-reach // scale) * scale


@dataclass(frozen=True)
class Techniques:
    """How a stage saves memory. Each costs time or quality, so the fit takes the cheapest that fits."""

    history: int = 20  # L-BFGS pairs kept (each costs 2 x the picture)
    checkpoint: bool = False  # per-block activation checkpointing: one more forward pass
    tile: int | None = None  # the tiled VGG pass's core edge, px: one more forward pass, plus halos

    def names(self) -> list[str]:
        return [n for n, on in (("activation checkpointing", self.checkpoint),
                                (f"tiled VGG pass ({self.tile} px tiles)", self.tile)) if on]

    def cost(self, height: int, width: int, deepest: str) -> float:
        """Compute per step relative to the plain pass (forward 1, backward 2), with a small
        penalty for a shorter L-BFGS history (it converges a little slower)."""
        passes = 3.0 + (1.0 if self.checkpoint else 0.0)
        if self.tile:
            _, halo = _grid_and_halo(deepest)
            area = sum((min(height, y + self.tile + halo) - max(0, y - halo)) * (min(width, x + self.tile + halo) - max(0, x - halo))
                       for y in range(0, height, self.tile) for x in range(0, width, self.tile))
            passes = (passes + 1.0) * area / (height * width)
        return passes / 3.0 * (1.0 + 0.01 * max(0, 20 - self.history))


#: Bytes a style loss kind keeps per element of a style layer's map beyond Gram's in a step:
#: sliced, with K = C directions of the step's set, the projections, the sorted values, the sort's
#: int64 indices, the difference to the target and the target resampled to the picture
#: (4 + 4 + 8 + 4 + 4). Its targets: `_sliced_targets`.
_LOSS_MAP_BYTES = {"sliced": 24}


def _sliced_targets(height: int, width: int, style: set[str], style_loss: str) -> int:
    """The sliced kind's targets: every set's quantiles (at most SLICED_QUANTILES a direction) of
    each style layer, for a style as large as a square of the picture's long edge."""
    if style_loss != "sliced":
        return 0
    side = max(height, width)
    maps = feature_maps(side, side, max(style, key=layer_index)) if style else []
    return sum(min(n // CHANNELS[int(name[4])], SLICED_QUANTILES) * CHANNELS[int(name[4])]
               for name, n in maps if name in style) * _FP32 * SLICED_SETS


def _loss_extra(maps: list[tuple[str, int]], style: set[str], style_loss: str, per_map: dict,
                w2_matrices: int = 3 * NS_ITERS + 8) -> int:
    """A style loss kind's bytes beyond Gram's: per element of the style layers' maps (`per_map`),
    and for w2 its C x C matrices per layer (a step's: the moments, the covariance, the product,
    and Newton-Schulz's three iterates a round, styleloss.NS_ITERS rounds, saved for the backward;
    a target's: its square root beside the second moment)."""
    extra = sum(n for name, n in maps if name in style) * per_map.get(style_loss, 0)
    if style_loss == "w2":
        extra += sum(CONV_SHAPES[n][0] ** 2 for n in style if n in CONV_SHAPES) * _FP32 * w2_matrices
    return extra


def _activations(height: int, width: int, layers: Sequence[str], precision: str, pooling: str,
                 checkpoint: bool, content_layers: Sequence[str] | None = None,
                 style_loss: str = "gram", regions: int = 0) -> tuple[int, int]:
    """(bytes autograd keeps through one forward+backward at its peak, the largest map's elements).

    Autograd saves each ReLU's output (which is also the next conv's or pool's input); max pooling
    (and mix) also saves int64 indices. The losses save fp32 maps of their own: a Gram matrix the fp32 copy
    of a bf16 map (in fp32, the map itself), the content loss its difference to the target.
    Checkpointed, each block (ending at its pool) keeps only its pooled output and the maps the
    losses use, and in the backward one block at a time is recomputed with all it saves. The
    style loss kind's own (`_loss_extra`) come on top, once per masked region (regions.py: each
    has its own loss), and each of `regions` its fp32 copy of each style map times its weights
    (the sliced kind: its weights, their running sum and places, per projection)."""
    deepest = max(layers, key=layer_index)
    act = 2 if precision == "bf16" else _FP32
    maps = feature_maps(height, width, deepest)
    content = set(content_layers if content_layers is not None else ())
    style = set(layers) - content if content_layers is not None else set(layers)

    def kept(some: list[tuple[str, int]]) -> int:
        total = sum(n for _, n in some) * act
        if pooling in ("max", "mix"):
            total += sum(n for name, n in some if name.startswith("pool")) * 8
        return total

    largest = max(n for _, n in maps)
    content_saved = sum(n for name, n in maps if name in content) * _FP32 + max(1, regions) * _loss_extra(
        maps, style, style_loss, _LOSS_MAP_BYTES)
    content_saved += regions * sum(n for name, n in maps if name in style) * _FP32 * (3 if style_loss == "sliced" else 1)
    if not checkpoint:
        style_copies = sum(n for name, n in maps if name in style) * _FP32 if act != _FP32 else 0
        return kept(maps) + style_copies + content_saved, largest
    blocks: list[list[tuple[str, int]]] = [[]]
    for name, n in maps:
        blocks[-1].append((name, n))
        if name.startswith("pool"):
            blocks.append([])
    inputs = kept([(name, n) for name, n in maps if name.startswith("pool")]) + 3 * height * width * (_FP32 + act)
    style_saved = sum(n for name, n in maps if name in style) * _FP32
    return inputs + style_saved + content_saved + max(kept(b) for b in blocks if b), largest


def _window(height: int, width: int, tile: int | None, deepest: str) -> tuple[int, int]:
    """(h, w) of the largest window a pass in tiles of `tile` px sees (its core rounded up to the
    deepest map's grid, a halo on each side, cut at the picture's edge); the picture untiled."""
    if not tile:
        return height, width
    grid, halo = _grid_and_halo(deepest)
    tile = -(-tile // grid) * grid
    return min(height, tile + 2 * halo), min(width, tile + 2 * halo)


def _weights(deepest: str, precision: str) -> int:
    """The network's bytes up to `deepest`, with autocast's bf16 copies where it runs in bf16."""
    weights = sum((s[0] * s[1] * s[2] * s[3] + s[0]) * _FP32
                  for n, s in CONV_SHAPES.items() if layer_index(n) <= layer_index(deepest))
    return weights + weights // 2 if precision == "bf16" else weights


def predict_peak_bytes(
    height: int,
    width: int,
    layers: Sequence[str],
    optimizer: str = "lbfgs",
    history: int = 20,
    precision: str = "fp32",
    pooling: str = "avg",
    device: str = "cpu",
    checkpoint: bool = False,
    tile: int | None = None,
    content_layers: Sequence[str] | None = None,
    anchor: tuple[int, int] | None = None,
    style_loss: str = "gram",
    regions: int = 0,
    jitter: int = 0,
) -> int:
    """Predicted peak bytes of one stylization at `height` x `width` on `device` ("cpu" or "cuda"),
    with the given techniques: the allocator's view (torch.cuda.max_memory_allocated), without
    the CUDA context itself. `layers`: every layer the losses use; `content_layers`: those whose
    whole maps are kept as targets (all of `layers` when not given: an upper bound); `anchor`:
    (h, w) of the anchor's pass (anchor.Anchor), which runs after the main one, alone; `style_loss`:
    the style loss kind (styleloss.py), whose own tensors are counted; `regions`: how many masked
    regions the style term has (regions.count; 0 without masks); `jitter`: the shift's pad (jitter.py)."""
    deepest = max(layers, key=layer_index)
    shifted = jitter > 0 and tile is None  # jitter.for_stage: not in a tiled pass
    # tiled, autograd holds one tile's window at a time (core + halo on each side, cut at the edge)
    saved, largest = _activations(*_window(height, width, tile, deepest), layers, precision, pooling, checkpoint,
                                  content_layers, style_loss, regions)
    if anchor:
        style_only = [n for n in layers if content_layers is None or n not in content_layers] or list(layers)
        a_saved, a_largest = _activations(*anchor, style_only, precision, pooling, False, [], style_loss, regions)
        saved, largest = max(saved, a_saved), max(largest, a_largest)
    transient = _TRANSIENT_MAPS * largest * _FP32
    weights = _weights(deepest, precision)
    pixels = 3 * height * width * _FP32
    # The picture, its gradient, the guard's best picture, the content picture; L-BFGS's 2 x history
    # pairs, its direction and last gradient, and up to three temporaries within a step (Adam: its
    # two averages and two temporaries).
    state = 2 * history + 5 if optimizer == "lbfgs" else 4
    image = pixels * (4 + state)
    if regions:  # one-channel maps: each region's weights (and their pooled copies, a third more), keep, held
        image += pixels // 3 * (2 * regions + 2)
    full_maps = feature_maps(height, width, deepest)
    kept = content_layers if content_layers is not None else layers
    targets = sum(n for name, n in full_maps if name in kept) * _FP32  # the content features
    if shifted:  # under each shift; the padded picture, the shifted view and their gradients; masks
        targets *= SHIFTS
        image += 4 * pixels + pixels // 3 * 3 * regions * SHIFTS
    per_region = sum(CONV_SHAPES[n][0] ** 2 for n in layers if n in CONV_SHAPES) * _FP32 * 2
    style = set(layers) - set(content_layers or ())
    per_region += _loss_extra(full_maps, style or set(layers), style_loss, {}, 2)
    per_region += _sliced_targets(height, width, style or set(layers), style_loss)
    if anchor:
        per_region += _loss_extra(feature_maps(*anchor, deepest), style or set(layers), style_loss, {}, 2)
        per_region += _sliced_targets(*anchor, style or set(layers), style_loss)
    targets += max(1, regions) * per_region  # each region has its targets (its styles' blend)
    reserve = CUDA_RESERVE_BYTES if device.startswith("cuda") else 0
    return int(saved + transient + weights + image + targets + reserve)


#: Tile edges the fit tries, largest (cheapest) first.
TILE_SIZES = (2048, 1024, 768, 512, 384, 256, 128)
#: The fit shortens the L-BFGS history down to this before it gives up.
MIN_HISTORY = 5


def choose(height: int, width: int, budget_bytes: int | None, layers: Sequence[str], optimizer: str = "lbfgs",
           history: int = 20, precision: str = "fp32", pooling: str = "avg", device: str = "cpu",
           content_layers: Sequence[str] | None = None, anchor: tuple[int, int] | None = None,
           style_loss: str = "gram", tiles: bool = True, regions: int = 0, jitter: int = 0) -> Techniques | None:
    """The cheapest techniques (Techniques.cost) whose predicted peak fits `budget_bytes` at this
    size; plain with the full history when there is no budget; None when nothing fits. `tiles`:
    whether a tiled pass may be chosen (not for style_loss sliced, whose sort is not a sum)."""
    plain = Techniques(history=history)
    if budget_bytes is None:
        return plain
    deepest = max(layers, key=layer_index)
    histories = sorted({history, *[h for h in (20, 10, MIN_HISTORY) if h < history]}, reverse=True)
    options = [Techniques(h, c, t) for h in histories for c in (False, True)
               for t in (None, *[t for t in TILE_SIZES if tiles and t < max(height, width)])]
    fits = [o for o in options
            if predict_peak_bytes(height, width, layers, optimizer, o.history if optimizer == "lbfgs" else 0,
                                  precision, pooling, device, o.checkpoint, o.tile, content_layers, anchor,
                                  style_loss, regions, jitter) <= budget_bytes]
    return min(fits, key=lambda o: (o.cost(height, width, deepest), -o.history)) if fits else None


#: A style target pass's peak, in its largest feature map (see predict_target_bytes).
_TARGET_MAPS = 8


def predict_target_bytes(height: int, width: int, layers: Sequence[str], precision: str = "fp32",
                         pooling: str = "avg", device: str = "cpu", tile: int | None = None,
                         style_loss: str = "gram") -> int:
    """Predicted peak bytes of one style target pass (no gradient) over a `height` x `width`
    picture, in tiles of `tile` px when set: the picture, the network, the largest maps alive at
    once and the Gram sums. A style is sized by the result's long edge, not by the content's
    area: a thin content's stage can be small while its style's pass is not (#26)."""
    deepest = max(layers, key=layer_index)
    largest = max(n for _, n in feature_maps(*_window(height, width, tile, deepest), deepest))
    # Measured on the CPU after a first pass (tests/test_memory.py), a no-grad pass peaks at 3 to
    # 7.5 of its largest map (the maps alive, their successors, a Gram's float copy, the
    # convolutions' own buffers, the allocator's slack): 8 of them, to be safe.
    transient = _TARGET_MAPS * largest * _FP32
    weights = _weights(deepest, precision)
    # the picture, its colour-adjusted copy, a tile's crop; and before them the resized style as
    # Pillow holds it (4 bytes a pixel) and its 8-bit array (a 4000x400 content with a 2400x1900
    # style at 256 MiB grew 263 MiB before these were counted)
    pixels = 3 * height * width * _FP32 * 3 + height * width * (4 + 3)
    grams = sum(CONV_SHAPES[n][0] ** 2 for n in layers if n in CONV_SHAPES) * _FP32 * 2
    # sliced: the whole picture's projections on one set, their sorted copy and the sort's indices
    # (over tiles: every set's projections gathered, then one set's sort), and every set's kept
    # quantiles; w2: its second moments, as Gram's
    sliced = {"sliced": 4 * SLICED_SETS + 12 if tile else 16}
    grams += _loss_extra(feature_maps(height, width, deepest), set(layers), style_loss, sliced, 2)
    grams += _sliced_targets(height, width, set(layers), style_loss)
    reserve = CUDA_RESERVE_BYTES if device.startswith("cuda") else 0
    return int(transient + weights + pixels + grams + reserve)


def target_tile(height: int, width: int, budget_bytes: int | None, layers: Sequence[str], **kw) -> int | None:
    """The tile a style target pass needs to fit `budget_bytes`: None when the whole pass does,
    else the largest of TILE_SIZES that does (the smallest when none does)."""
    if budget_bytes is None or predict_target_bytes(height, width, layers, **kw) <= budget_bytes:
        return None
    for t in TILE_SIZES:
        if t < max(height, width) and predict_target_bytes(height, width, layers, tile=t, **kw) <= budget_bytes:
            return t
    return TILE_SIZES[-1]


def fit_size(
    height: int, width: int, budget_bytes: int, min_long_edge: int = 32, **kwargs
) -> tuple[int, int] | None:
    """The largest (h, w) of the same aspect for which some techniques fit `budget_bytes`
    (`choose`), or None. Shrinking is the last resort: the techniques come first."""
    long_edge, min_long_edge = max(height, width), max(1, min_long_edge)
    while long_edge >= min_long_edge:
        scale = long_edge / max(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        if choose(h, w, budget_bytes, **kwargs) is not None:
            return h, w
        long_edge = int(long_edge * 0.9)
    return None
