import torch
import pytest

from nstd.engine import vgg
from nstd.engine.vgg import CONV_LAYERS, CONV_SHAPES, Network, WeightsError


def test_caffe_weights_decode_to_vgg19_shapes():
    path = vgg.caffe_weights_path()
    raw = torch.load(path, weights_only=True)
    assert sorted(k[: -len("_W_q")] for k in raw if k.endswith("_W_q")) == sorted(vgg.CAFFE_NAME.values())
    weights = vgg.load_caffe_weights()
    assert list(weights) == list(CONV_LAYERS)
    for name, (w, b) in weights.items():
        assert tuple(w.shape) == CONV_SHAPES[name] and w.dtype == torch.float32
        assert tuple(b.shape) == (CONV_SHAPES[name][0],) and b.dtype == torch.float32
        # every decoded weight is one of the layer's 256 centroids
        table = raw[vgg.CAFFE_NAME[name] + "_W_table"]
        assert torch.isin(w.flatten()[:1000], table).all()


def _torchvision_state(path, *, drop=None, bad_shape=None):
    state = {}
    for name, shape in CONV_SHAPES.items():
        i = vgg.TORCHVISION_INDEX[name]
        state[f"features.{i}.weight"] = torch.randn(shape) * 0.01
        state[f"features.{i}.bias"] = torch.zeros(shape[0])
    state["classifier.6.bias"] = torch.zeros(1000)  # extra keys of the full model are ignored
    if drop:
        del state[drop]
    if bad_shape:
        state[bad_shape] = torch.zeros(3)
    torch.save(state, path)
    return state


def test_torchvision_weights_from_file(tmp_path):
    state = _torchvision_state(tmp_path / "vgg19.pth")
    weights = vgg.load_torchvision_weights(tmp_path / "vgg19.pth")
    assert list(weights) == list(CONV_LAYERS)
    assert torch.equal(weights["conv3_2"][0], state["features.12.weight"])


def test_torchvision_download_path_uses_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import VGG19_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / VGG19_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    state = _torchvision_state(cached)
    weights = vgg.load_torchvision_weights(None)
    assert torch.equal(weights["conv5_4"][0], state["features.34.weight"])


def test_torchvision_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torch.hub

    def refuse(url, dst, *a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(WeightsError, match="could not download.*weights_file"):
        vgg.load_torchvision_weights(None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop": "features.21.weight"}, "features.21.weight' is missing"),
        ({"bad_shape": "features.0.weight"}, r"features.0.weight' has shape \(3,\), expected \(64, 3, 3, 3\)"),
    ],
)
def test_malformed_torchvision_file(tmp_path, kwargs, message):
    _torchvision_state(tmp_path / "w.pth", **kwargs)
    with pytest.raises(WeightsError, match=message):
        vgg.load_torchvision_weights(tmp_path / "w.pth")


def test_missing_and_garbage_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        vgg.load_weights("torchvision", tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch weights file"):
        vgg.load_weights("vgg19-caffe", tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        vgg.load_weights("torchvision", tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="unknown weights"):
        vgg.load_weights("resnet")


def test_caffe_input_is_0_255_minus_mean_in_rgb_order():
    norm = vgg.Normalize(vgg.CAFFE_INPUT)
    x = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)  # RGB
    out = norm(x).flatten()
    expected = torch.tensor([255.0 - 123.68, 127.5 - 116.779, 0.0 - 103.939])  # RGB; the means are BGR's
    assert torch.allclose(out, expected, atol=1e-3)


def test_the_bgr_swap_on_conv1_1_gives_the_features_of_bgr_input():
    """The caffe weights see BGR: swapping conv1_1's input channels once must equal reordering
    the picture on every forward, to float rounding."""
    weights = vgg.load_caffe_weights()
    net = Network(weights, vgg.CAFFE_INPUT)
    x = torch.rand(1, 3, 24, 32)
    w, b = weights["conv1_1"]
    t = vgg.CAFFE_INPUT
    bgr = x[:, list(t.channel_order)] * t.scale - torch.tensor(t.mean).view(1, 3, 1, 1)
    expected = torch.relu(torch.nn.functional.conv2d(bgr, w, b, padding=1))
    got = net.extractor(["conv1_1"])(x)["conv1_1"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_torchvision_input_is_imagenet_normalised():
    norm = vgg.Normalize(vgg.TORCHVISION_INPUT)
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), torch.zeros(1, 3, 1, 1), atol=1e-6)


def test_extractor_computes_nothing_past_the_deepest_layer():
    weights = vgg.load_caffe_weights()
    deepest = vgg.layer_index("conv3_1")
    for name in CONV_LAYERS[deepest + 1 :]:
        w, b = weights[name]
        weights[name] = (torch.full_like(w, float("nan")), b)  # poison everything deeper
    net = Network(weights, vgg.CAFFE_INPUT)
    ran = []
    for name, conv in net.convs.items():
        conv.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    ext = net.extractor(["conv1_1", "conv3_1", "conv2_1"], "avg")
    out = ext(torch.rand(1, 3, 40, 40))
    assert ran == list(CONV_LAYERS[: deepest + 1])
    assert set(out) == {"conv1_1", "conv2_1", "conv3_1"}
    assert all(torch.isfinite(t).all() for t in out.values())
    assert out["conv3_1"].shape == (1, 256, 10, 10)
    assert (out["conv1_1"] >= 0).all()  # post-ReLU


def test_network_is_frozen_and_extractors_share_weights():
    net = Network(vgg.load_caffe_weights(), vgg.CAFFE_INPUT)
    assert not any(p.requires_grad for c in net.convs.values() for p in c.parameters())
    a = net.extractor(["conv4_2"], "avg")
    b = net.extractor(["conv5_1"], "max")
    assert a.layers[0].weight is b.layers[0].weight
    assert net.extractor(["conv4_2"], "avg") is a
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in b.layers)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in a.layers)


def test_mixed_pooling_is_the_mean_of_average_and_max():
    net = Network(vgg.load_caffe_weights(), vgg.CAFFE_INPUT)
    x = torch.rand(1, 3, 24, 24)
    got = {p: net.extractor(["conv1_1", "conv2_1"], p)(x) for p in ("avg", "max", "mix")}
    assert torch.equal(got["mix"]["conv1_1"], got["avg"]["conv1_1"])  # before the first pool: the same
    # after it: conv2_1 sees the mean of the two pools of conv1_2's map
    mix = net.extractor(["conv2_1"], "mix")
    first = net.extractor(["conv1_2"], "avg")(x)["conv1_2"]
    pooled = 0.5 * (torch.nn.functional.avg_pool2d(first, 2) + torch.nn.functional.max_pool2d(first, 2))
    assert torch.allclose(mix(x)["conv2_1"], torch.relu(net.convs["conv2_1"](pooled)), atol=1e-4)
    assert not torch.equal(got["mix"]["conv2_1"], got["avg"]["conv2_1"])
    assert not torch.equal(got["mix"]["conv2_1"], got["max"]["conv2_1"])
    with pytest.raises(ValueError, match="avg, max, mix"):
        net.extractor(["conv2_1"], "median")
