"""ResNet-50 with every width multiplied (SimCLR v1's ResNet-50 (1x), (2x), (4x)).

SimCLR widens the whole network, stem included: with width ``w`` the stem has 64w channels and stage
``i`` has bottleneck width 64w * 2^i and output 256w * 2^i, so the pooled feature is 2048w
(8192-d for 4x). This differs from torchvision's ``wide_resnet50_2``, which widens only the inner 3x3
convolutions. Module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), so converted files with torchvision names load directly and the
TensorFlow names of the original checkpoints map onto them one to one (see :func:`tf_to_torchvision`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

STAGE_BLOCKS = (3, 4, 6, 3)  # ResNet-50
WIDTHS = (1, 2, 4)


class WideResNet50(nn.Module):
    """forward: normalised images (B, 3, H, W) -> pooled features (B, 2048 * width)."""

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        stem = 64 * width
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i, blocks in enumerate(STAGE_BLOCKS):
            planes = stem * 2**i  # bottleneck width; the block outputs 4x this
            stride = 1 if i == 0 else 2  # stride on the 3x3 conv (torchvision's ResNet v1.5), as SimCLR
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            layers += [Bottleneck(planes * 4, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()  # the pooled feature is the output; a stored classifier is not part of it
        self.feat_dim = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def wide_resnet50(width: int) -> WideResNet50:
    """SimCLR's ResNet-50 (``width``x) with torchvision names and no classifier."""
    if width not in WIDTHS:
        raise ValueError(f"SimCLR ResNet-50 width must be one of {WIDTHS}, got {width}")
    return WideResNet50(width)


def _tf_module_order() -> list[str]:
    """torchvision module names in the order TensorFlow numbered them (the shortcut comes first in a stage)."""
    order = ["conv1|bn1"]
    for i, blocks in enumerate(STAGE_BLOCKS):
        for j in range(blocks):
            block = f"layer{i + 1}.{j}"
            if j == 0:
                order.append(f"{block}.downsample.0|{block}.downsample.1")
            order += [f"{block}.conv{k}|{block}.bn{k}" for k in (1, 2, 3)]
    return order


def tf_to_torchvision() -> dict[str, str]:
    """Map TensorFlow layer names (``conv2d_N`` / ``batch_normalization_N``) to torchvision module names.

    The N-th convolution of the TF graph and the N-th batch normalisation belong together: N = 0 (no
    suffix) is the stem, then every stage's first block lists its projection shortcut before its three
    convolutions (layer1.0: shortcut 1, convs 2-4; layer1.1: 5-7; ...; layer4.2: 50-52).
    """
    table = {}
    for n, pair in enumerate(_tf_module_order()):
        conv, bn = pair.split("|")
        suffix = f"_{n}" if n else ""
        table[f"conv2d{suffix}"] = conv
        table[f"batch_normalization{suffix}"] = bn
    return table
