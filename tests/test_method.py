"""The method's exact pieces: loss, prediction heads, learning-rate schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import UserError
from models.simreg import build_head, regression_loss
from tools.engine.schedules import cosine_lr


def test_loss_equals_two_minus_two_cos_and_squared_distance():
    torch.manual_seed(0)
    p, t = torch.randn(16, 32), torch.randn(16, 32)
    loss = regression_loss(p, t)
    cos = nn.functional.cosine_similarity(p, t, dim=1)
    assert torch.allclose(loss, (2 - 2 * cos).mean(), atol=1e-6)
    pn, tn = p / p.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    assert torch.allclose(loss, ((pn - tn) ** 2).sum(dim=1).mean(), atol=1e-6)


def test_loss_extremes_and_scale_invariance():
    v = torch.randn(4, 8)
    assert regression_loss(v, 3 * v).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(v, -v).item() == pytest.approx(4.0, abs=1e-6)


def test_loss_is_fp32_for_low_precision_inputs():
    p, t = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).half()
    assert regression_loss(p, t).dtype == torch.float32


def _layout(head):
    return [type(m).__name__ for m in head], {k: tuple(v.shape) for k, v in head.state_dict().items()}


def test_four_layer_head_matches_paper_layout():
    types, shapes = _layout(build_head(512, 2048, 4))
    assert types == ["Linear", "BatchNorm1d", "ReLU", "Linear", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    params = {k: v for k, v in shapes.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert params == {
        "0.weight": (1024, 512), "0.bias": (1024,),
        "1.weight": (1024,), "1.bias": (1024,),
        "3.weight": (512, 1024), "3.bias": (512,),
        "4.weight": (1024, 512), "4.bias": (1024,),
        "5.weight": (1024,), "5.bias": (1024,),
        "7.weight": (2048, 1024), "7.bias": (2048,),
    }  # fmt: skip
    assert shapes["1.running_mean"] == (1024,) and shapes["5.running_var"] == (1024,)


def test_two_layer_head_is_nonlinear():
    types, shapes = _layout(build_head(1280, 2048, 2))
    assert types == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert shapes["0.weight"] == (2560, 1280) and shapes["3.weight"] == (2048, 2560)


def test_linear_predictor_is_bn_then_linear():
    types, shapes = _layout(build_head(2048, 8192, 0))
    assert types == ["BatchNorm1d", "Linear"]
    assert shapes["0.weight"] == (2048,) and shapes["1.weight"] == (8192, 2048)


def test_unknown_head_depth_is_a_user_error():
    with pytest.raises(UserError, match="n_mlp_layers"):
        build_head(8, 8, 3)


@pytest.mark.parametrize("epoch", [1, 2, 33, 65, 100, 130])
def test_cosine_schedule_matches_formula(epoch):
    assert cosine_lr(0.05, epoch, 130) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 130)))


def test_cosine_schedule_values():
    assert cosine_lr(0.05, 1, 130) == 0.05  # no warm-up: epoch 1 at the base rate
    assert cosine_lr(0.05, 66, 130) == pytest.approx(0.025)
    assert cosine_lr(0.05, 130, 130) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 129 / 130)))


def test_imagenet100_subset_reproduces_the_original_draw():
    from data.datasets import imagenet100_classes

    classes = [f"n{i:08d}" for i in range(1000)]
    np.random.seed(1234)  # the original's calls, on the legacy global generator
    expected = sorted(classes[i] for i in np.random.permutation(1000)[:100])
    got = imagenet100_classes(list(reversed(classes)))  # folder order must not matter
    assert got == expected and len(set(got)) == 100
    with pytest.raises(UserError, match="at least 100 class folders"):
        imagenet100_classes(classes[:50])
