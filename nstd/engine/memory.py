"""Predicting a job's peak memory before it runs, so the daemon can fit it in a VRAM budget.

The model counts what a stylization step keeps alive at once: the frozen weights in use, the
activations autograd saves for the backward pass, the largest transient buffers of the backward
pass, the image with its gradient, the optimiser's state (L-BFGS keeps 2 x history image-sized
vectors), and the content and style targets.
"""
from __future__ import annotations

from typing import Sequence

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


def predict_peak_bytes(
    height: int,
    width: int,
    layers: Sequence[str],
    optimizer: str = "lbfgs",
    history: int = 20,
    precision: str = "fp32",
    pooling: str = "avg",
    device: str = "cpu",
) -> int:
    """Predicted peak bytes of one stylization at `height` x `width` on `device` ("cpu" or "cuda"):
    the allocator's view (torch.cuda.max_memory_allocated), without the CUDA context itself."""
    deepest = max(layers, key=layer_index)
    act = 2 if precision == "bf16" else _FP32
    maps = feature_maps(height, width, deepest)
    # Autograd saves each ReLU's output (which is also the next conv's or pool's input); under
    # autocast the conv output is a second, bf16 tensor. Max pooling also saves int64 indices.
    saved = sum(n for _, n in maps) * act
    if precision == "bf16":
        saved += sum(n for name, n in maps if name.startswith("conv")) * act
    if pooling == "max":
        saved += sum(n for name, n in maps if name.startswith("pool")) * 8
    transient = _TRANSIENT_MAPS * max(n for _, n in maps) * _FP32
    weights = sum(
        (s[0] * s[1] * s[2] * s[3] + s[0]) * _FP32 for n, s in CONV_SHAPES.items() if layer_index(n) <= layer_index(deepest)
    )
    if precision == "bf16":
        weights += weights // 2  # autocast's bf16 copies
    pixels = 3 * height * width * _FP32
    state = 2 * history + 4 if optimizer == "lbfgs" else 2
    image = pixels * (2 + state)  # image, grad, optimiser state
    targets = sum(n for name, n in maps if name in layers) * _FP32  # content features at most
    targets += sum(CONV_SHAPES[n][0] ** 2 for n in layers if n in CONV_SHAPES) * _FP32 * 2
    reserve = CUDA_RESERVE_BYTES if device.startswith("cuda") else 0
    return int(saved + transient + weights + image + targets + reserve)


def fit_size(
    height: int, width: int, budget_bytes: int, min_long_edge: int = 32, **kwargs
) -> tuple[int, int] | None:
    """The largest (h, w) of the same aspect whose predicted peak fits `budget_bytes`, or None."""
    long_edge = max(height, width)
    while long_edge >= min_long_edge:
        scale = long_edge / max(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        if predict_peak_bytes(h, w, **kwargs) <= budget_bytes:
            return h, w
        long_edge = int(long_edge * 0.9)
    return None
