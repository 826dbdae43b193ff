"""ResNet-50 with TensorFlow "SAME" padding, for BYOL's converted weights (the original's ``byol_resnet50``).

BYOL was trained in JAX/Haiku, whose strided convolutions and max-pool pad "SAME": the total padding
``max((ceil(n / s) - 1) * s + k - n, 0)`` is split with the smaller half on the top/left, so a 7x7
stride-2 convolution on 224 pixels pads 2 before and 3 after, where PyTorch pads 3 on both sides. With
PyTorch's symmetric padding the converted BYOL weights lose about 4.6 points of linear accuracy.

Only layers with kernel > 1 and stride > 1 change: for stride 1 "SAME" is the symmetric (k - 1) / 2
PyTorch already uses, and a 1x1 stride-2 shortcut never needs padding. Parameter names stay
torchvision's, so converted files load directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) along one spatial dimension of length ``size``."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric when needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel_size, self.stride)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """nn.MaxPool2d with "SAME" padding; padded cells are -inf so they never win, as in TensorFlow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = nn.modules.utils._pair(self.kernel_size), nn.modules.utils._pair(self.stride)
        return F.max_pool2d(_pad_same(x, k, s, float("-inf")), k, s, 0, self.dilation, self.ceil_mode)


def _same_conv(conv: nn.Conv2d) -> Conv2dSame:
    new = Conv2dSame(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        padding=0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.load_state_dict(conv.state_dict(), assign=True)
    return new


def to_same_padding(net: nn.Module) -> nn.Module:
    """Swap, in place, every strided convolution with kernel > 1 and every max-pool to "SAME" padding."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.Conv2d) and max(child.kernel_size) > 1 and max(child.stride) > 1:
            setattr(net, name, _same_conv(child))
        elif isinstance(child, nn.MaxPool2d):
            setattr(net, name, MaxPool2dSame(child.kernel_size, child.stride, 0, child.dilation))
        else:
            to_same_padding(child)
    return net


def byol_resnet50() -> nn.Module:
    """torchvision ResNet-50 with "SAME" padding and no classifier: (B, 3, H, W) -> (B, 2048)."""
    net = to_same_padding(torchvision.models.resnet50())
    net.fc = nn.Identity()
    net.feat_dim = 2048
    return net
