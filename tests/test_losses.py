import pytest
import torch

from nstd.engine.losses import Objective, Target, blend_grams, gram, tv_loss


def test_gram_matches_hand_computation():
    # 2 channels, 2x2 pixels: F = [[1,2,3,4],[0,1,0,1]]
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    # F F^T = [[1+4+9+16, 0+2+0+4], [6, 0+1+0+1]] = [[30, 6], [6, 2]]; / (C*H*W = 8)
    expected = torch.tensor([[[30.0, 6.0], [6.0, 2.0]]]) / 8
    assert torch.allclose(gram(f), expected)


def test_gram_is_fp32_even_for_bf16_features():
    f = torch.randn(1, 4, 3, 3).to(torch.bfloat16)
    assert gram(f).dtype == torch.float32


def test_relative_target_is_scale_free():
    t = torch.randn(1, 8, 5, 5)
    x = t + 0.1 * torch.randn_like(t)
    a = Target.of(t).loss(x)
    b = Target.of(t * 255).loss(x * 255)
    assert torch.allclose(a, b, rtol=1e-5)


def test_blend_normalises_weights():
    g1 = {"conv1_1": torch.ones(1, 2, 2)}
    g2 = {"conv1_1": torch.zeros(1, 2, 2)}
    out = blend_grams([g1, g2], [3.0, 1.0])
    assert torch.allclose(out["conv1_1"], torch.full((1, 2, 2), 0.75))
    with pytest.raises(ValueError):
        blend_grams([g1, g2], [0.0, 0.0])
    with pytest.raises(ValueError):
        blend_grams([g1], [1.0, 2.0])


def test_tv_loss_zero_for_flat_and_positive_for_noise():
    assert float(tv_loss(torch.full((1, 3, 8, 8), 0.5))) == 0.0
    assert float(tv_loss(torch.rand(1, 3, 8, 8))) > 0.0


def test_objective_weights_each_term():
    feats = {"conv1_1": torch.rand(1, 4, 6, 6), "conv4_2": torch.rand(1, 4, 6, 6)}
    image = torch.rand(1, 3, 6, 6)
    obj = Objective({"conv4_2": feats["conv4_2"]}, {"conv1_1": gram(feats["conv1_1"]) * 2}, 1.0, 1e4, 0.0)
    losses = obj(feats, image)
    assert float(losses.content) == 0.0  # target equals features
    assert float(losses.style) > 0.0
    assert float(losses.tv) == 0.0
    assert torch.allclose(losses.total, losses.content + losses.style + losses.tv)
