"""The peak-memory model: it grows as it should, and it covers what autograd really keeps."""
import os
import subprocess
import sys

import pytest
import torch

from nstd.engine.memory import fit_size, predict_peak_bytes
from nstd.engine.losses import Objective

LAYERS = ["conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]


def test_grows_with_size_history_and_depth():
    p = lambda **kw: predict_peak_bytes(**{"height": 384, "width": 512, "layers": LAYERS, **kw})
    small, large = p(height=192, width=256), p()
    assert 2.5 < large / small < 4.5  # ~ pixel count, plus the fixed weights
    assert p(history=100) > p(history=10)
    assert p(optimizer="adam") < p(optimizer="lbfgs")
    assert p(layers=["conv3_1"]) < p()
    assert p(pooling="max") > p(pooling="avg")
    assert p(pooling="mix") == p(pooling="max")  # the max's indices; the average saves nothing


def test_fit_size_keeps_aspect_and_fits_the_budget():
    """Below what any technique makes fit (the picture-sized state alone), the size shrinks."""
    budget = predict_peak_bytes(600, 800, LAYERS, history=5, checkpoint=True, tile=128)
    h, w = fit_size(1536, 2048, budget, layers=LAYERS)
    assert w <= 900 and abs(w / h - 2048 / 1536) < 0.02
    assert predict_peak_bytes(h, w, LAYERS, history=5, checkpoint=True, tile=128) <= budget
    assert fit_size(1536, 2048, 1, layers=LAYERS) is None


@pytest.mark.parametrize("regions", [0, 3])
@pytest.mark.parametrize("style_loss", ["gram", "w2", "sliced"])
def test_covers_autograd_saved_tensors(engine, style_loss, regions):
    """Measure the bytes autograd saves for one step at 96 px and check the model accounts for them,
    for each style loss kind (styleloss.py: W2's matrices, the sliced loss's projections and sort),
    without masks and with three masked regions (regions.py: each its weighted copies)."""
    _check_saved_tensors(engine, style_loss, regions, "avg")


@pytest.mark.parametrize("pooling", ["max", "mix"])
def test_covers_the_pools_saved_tensors(engine, pooling):
    """The same for each pooling kind: the max's int64 indices (the mix's, too)."""
    _check_saved_tensors(engine, "gram", 0, pooling)


def _check_saved_tensors(engine, style_loss: str, regions: int, pooling: str) -> None:
    from nstd.engine.regions import Weights
    from nstd.engine.styleloss import style_kind

    kind = style_kind(style_loss)
    ext = engine.network.extractor(LAYERS, pooling)
    x = torch.rand(1, 3, 72, 96, requires_grad=True)
    with torch.no_grad():
        feats = ext(torch.rand(1, 3, 72, 96))
    stats = {k: kind.style_stat(k, feats[k]) for k in LAYERS[1:]}
    masks = [torch.rand(1, 1, 72, 96) for _ in range(regions)]
    obj = Objective({"conv4_2": feats["conv4_2"]}, stats if not regions else {}, 1.0, 1e4, 0.0, kind,
                    [(stats, Weights(m), 1 / regions) for m in masks] if regions else None)
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = obj(ext(x), x).total
    loss.backward()
    saved = sum(seen.values()) + _target_bytes(obj)
    predicted = predict_peak_bytes(72, 96, LAYERS, history=0, content_layers=["conv4_2"], style_loss=style_loss,
                                   regions=regions, pooling=pooling)
    weights = sum(p.numel() * 4 for c in ext.layers for p in c.parameters())
    assert saved + weights <= predicted <= 3 * (saved + weights), (saved, weights, predicted)


def _target_bytes(obj) -> int:
    """The bytes of the tensors the objective's style targets hold (the sliced kind's: every set's
    sorted projections and their copies resampled to the picture), each storage once."""
    storages: dict[int, int] = {}
    for r in obj.regions:
        for t in r.targets.values():
            for v in vars(t).values():
                for x in (v.values() if isinstance(v, dict) else [v]):
                    if isinstance(x, torch.Tensor):
                        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------- every pass under a budget

_PEAK = r"""
import resource, sys
import torch
from PIL import Image
from nstd.engine import Engine
from nstd.engine.params import StyleParams
torch.set_num_threads(2)
cw, ch, size, sw, sh, scale, styles, budget_mb = map(float, sys.argv[1:9])
e = Engine(device="cpu", precision="fp32")
content = Image.new("RGB", (int(cw), int(ch)), (120, 80, 60))
style = [(Image.effect_noise((int(sw), int(sh)), 60 + i).convert("RGB"), 1.0) for i in range(int(styles))]
# the baseline: the network loaded and run once (the CPU's convolutions keep their own copies)
e.stylize(content.resize((32, 32)), [(Image.new("RGB", (32, 32)), 1.0)], StyleParams(size=32, steps=1, stages=1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
p = StyleParams(size=int(size), steps=2, stages=1, style_scale=scale, anchor_size=0, frame_every=1)
budget = int(budget_mb) * 2**20
p = p.at_size(e.fit(content.size, p, budget))  # as the worker does: techniques first, a smaller picture last
e.stylize(content, style, p, budget_bytes=budget)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.parametrize("shape", [
    pytest.param((1000, 16, 1024, 1024, 640, 1.0, 1), id="thin"),  # the 2000x16 at 2048, halved
    pytest.param((16, 1000, 1024, 640, 1024, 1.0, 1), id="tall", marks=pytest.mark.slow),
    pytest.param((64, 48, 256, 1024, 640, 4.0, 3), id="small content, style_scale 4, three styles",
                 marks=pytest.mark.slow),
    pytest.param((1000, 16, 1024, 1024, 640, 1.0, 4), id="thin, four styles", marks=pytest.mark.slow),
    # the hostile replay's: grew 263 MiB over 256 before the resized style's own copies were counted
    pytest.param((4000, 400, 4000, 2400, 1900, 1.0, 1, 256), id="thin 4000 px, a big style, 256 MiB",
                 marks=pytest.mark.slow),
])
def test_every_pass_stays_within_the_budget_whatever_the_shape(shape):
    """The process grows by at most the budget over its baseline (the network loaded and run): the style
    passes are counted by the model too, not only the stage's, and the GIF's frames. Before: a
    1000x16 content at 1024 px with a 1024x640 style grew by 489 MiB (the style pass, untiled)."""
    shape, budget_mb = (shape[:7], shape[7]) if len(shape) > 7 else (shape, 300)
    out = subprocess.run([sys.executable, "-c", _PEAK, *map(str, shape), str(budget_mb)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    grew = int(out.stdout.split()[-1])
    assert grew <= budget_mb * 2**20, f"grew {grew / 2**20:.0f} MiB over a {budget_mb} MiB budget"


def test_a_style_pass_is_tiled_when_its_whole_pass_would_not_fit():
    from nstd.engine.memory import predict_target_bytes, target_tile

    whole = predict_target_bytes(1280, 2048, LAYERS[1:])
    assert target_tile(1280, 2048, whole, LAYERS[1:]) is None
    tile = target_tile(1280, 2048, whole // 4, LAYERS[1:])
    assert tile is not None and predict_target_bytes(1280, 2048, LAYERS[1:], tile=tile) <= whole // 4
