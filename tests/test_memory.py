"""The peak-memory model: it grows as it should, and it covers what autograd really keeps."""
import torch

from nstd.engine.memory import fit_size, predict_peak_bytes
from nstd.engine.losses import Objective, gram

LAYERS = ["conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]


def test_grows_with_size_history_and_depth():
    p = lambda **kw: predict_peak_bytes(**{"height": 384, "width": 512, "layers": LAYERS, **kw})
    small, large = p(height=192, width=256), p()
    assert 2.5 < large / small < 4.5  # ~ pixel count, plus the fixed weights
    assert p(history=100) > p(history=10)
    assert p(optimizer="adam") < p(optimizer="lbfgs")
    assert p(layers=["conv3_1"]) < p()
    assert p(pooling="max") > p(pooling="avg")


def test_fit_size_keeps_aspect_and_fits_the_budget():
    """Below what any technique makes fit (the picture-sized state alone), the size shrinks."""
    budget = predict_peak_bytes(600, 800, LAYERS, history=5, checkpoint=True, tile=128)
    h, w = fit_size(1536, 2048, budget, layers=LAYERS)
    assert w <= 900 and abs(w / h - 2048 / 1536) < 0.02
    assert predict_peak_bytes(h, w, LAYERS, history=5, checkpoint=True, tile=128) <= budget
    assert fit_size(1536, 2048, 1, layers=LAYERS) is None


def test_covers_autograd_saved_tensors(engine):
    """Measure the bytes autograd saves for one step at 96 px and check the model accounts for them."""
    ext = engine.network.extractor(LAYERS, "avg")
    x = torch.rand(1, 3, 72, 96, requires_grad=True)
    with torch.no_grad():
        feats = ext(torch.rand(1, 3, 72, 96))
    obj = Objective({"conv4_2": feats["conv4_2"]}, {k: gram(feats[k]) for k in LAYERS[1:]}, 1.0, 1e4, 0.0)
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = obj(ext(x), x).total
    loss.backward()
    saved = sum(seen.values())
    predicted = predict_peak_bytes(72, 96, LAYERS, history=0)
    weights = sum(p.numel() * 4 for c in ext.layers for p in c.parameters())
    assert saved + weights <= predicted <= 3 * (saved + weights), (saved, weights, predicted)
