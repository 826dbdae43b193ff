"""Student and teacher backbones: a registry of torchvision architectures without their classifier.

Every backbone returned here keeps torchvision's parameter names (so an exported state dict loads
into ``torchvision.models.<arch>()`` with only the classifier missing) and maps a normalised image
batch (B, 3, H, W) to its pooled feature (B, D).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from models.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (torchvision constructor, pooled feature dim, name of the classifier attribute)
BACKBONES: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "resnet18": (torchvision.models.resnet18, 512, "fc"),
    "resnet34": (torchvision.models.resnet34, 512, "fc"),
    "resnet50": (torchvision.models.resnet50, 2048, "fc"),
    "resnet101": (torchvision.models.resnet101, 2048, "fc"),
    "resnet152": (torchvision.models.resnet152, 2048, "fc"),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, 2048, "fc"),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 1280, "classifier"),
}

# The original release's names for the same networks.
ALIASES = {"mobilenet": "mobilenet_v2"}


def canonical_arch(name: str) -> str:
    """Resolve an alias (``mobilenet``) to its registry name, or fail naming the known ones."""
    name = ALIASES.get(name, name)
    if name not in BACKBONES:
        known = ", ".join(sorted(BACKBONES) + sorted(ALIASES))
        raise UserError(f"unknown architecture '{name}'; choose one of: {known}")
    return name


def build_backbone(arch: str) -> nn.Module:
    """A torchvision network with its classifier replaced by the identity.

    forward: (B, 3, H, W) normalised float -> (B, D) pooled features. The attribute ``feat_dim``
    holds D. ``nn.Identity`` has no parameters, so the state dict is torchvision's minus the classifier.
    """
    ctor, dim, clf = BACKBONES[canonical_arch(arch)]
    net = ctor()
    setattr(net, clf, nn.Identity())
    net.feat_dim = dim
    return net


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on float images in [0, 1]; buffers are not saved in state dicts."""

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        super().__init__()
        self.enabled = mean is not None
        if self.enabled:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std


class Encoder(nn.Module):
    """Image in [0, 1] -> pooled feature: the network's own normalisation, then the backbone.

    ``encoder.backbone.state_dict()`` is the torchvision-named state dict that checkpoints store.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        mean: tuple[float, ...] | None = IMAGENET_MEAN,
        std: tuple[float, ...] | None = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, D)
        return self.backbone(self.normalize(x))


def build_encoder(arch: str) -> Encoder:
    """A student encoder for ``arch`` with ImageNet normalisation inside."""
    net = build_backbone(arch)
    return Encoder(net, net.feat_dim)
