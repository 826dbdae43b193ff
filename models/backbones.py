"""Student and teacher backbones: every torchvision classification model and every timm model by name.

A torchvision backbone keeps torchvision's parameter names with its classifier (the last ``nn.Linear``:
``fc``, ``classifier.1``, ``heads.head``...) replaced by the identity, so an exported state dict loads
into ``torchvision.models.<arch>()`` with only the classifier missing; the feature size is that
Linear's input size, read from the model. ``timm/<name>`` builds timm's network without classifier
(:mod:`models.timm_models`). Every backbone maps a normalised image batch (B, 3, H, W) to its pooled
feature (B, D).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from models.errors import UserError
from models.timm_models import TIMM_PREFIX, build_timm, is_timm_arch, timm_mean_std, timm_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Every torchvision classification model (squeezenet has a convolutional classifier: no linear feature).
BACKBONES: tuple[str, ...] = tuple(
    n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith("squeezenet")
)

# The original release's names for the same networks.
ALIASES = {"mobilenet": "mobilenet_v2"}
# Networks whose auxiliary training heads would make forward() return a tuple in train mode.
NO_AUX = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def canonical_arch(name: str) -> str:
    """Resolve an alias (``mobilenet``) to its registry name, or fail naming the known ones."""
    name = ALIASES.get(name, name)
    if is_timm_arch(name):
        timm_name(name)  # a UserError if timm has no such model
        return name
    if name.startswith("squeezenet"):
        raise UserError(f"'{name}' ends in a convolutional classifier, so it has no pooled linear feature to distil")
    if name not in BACKBONES:
        raise UserError(
            f"unknown architecture '{name}'; choose a torchvision classification model ({', '.join(BACKBONES[:6])}, "
            f"..., {len(BACKBONES)} in all), one of {', '.join(ALIASES)}, or {TIMM_PREFIX}<name> for a timm model"
        )
    return name


def strip_classifier(net: nn.Module) -> tuple[str, int]:
    """Replace ``net``'s classifier (its last ``nn.Linear``) and a Dropout right before it by identities.

    Returns (the classifier's module name, its input size = the feature size). Dropout has no weights,
    so the state dict is the network's minus the classifier; without it the pooled feature is what the
    classifier saw at inference (no dropout on the regressed feature during training).
    """
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(net).__name__} has no linear classifier to remove, so no pooled feature")
    name = linears[-1]
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    dim = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) > 0:
        before = parent[int(child) - 1]
        if isinstance(before, nn.Dropout):
            parent[int(child) - 1] = nn.Identity()
    return name, dim


def build_backbone(arch: str) -> nn.Module:
    """A network without its classifier: (B, 3, H, W) normalised float -> (B, D) pooled features.

    ``feat_dim`` holds D; ``classifier_prefixes`` the key prefixes of the removed classifier (what a
    file of this architecture may hold beyond the backbone).
    """
    arch = canonical_arch(arch)
    if is_timm_arch(arch):
        return build_timm(arch)
    net = torchvision.models.get_model(arch, weights=None, **NO_AUX.get(arch, {}))
    name, dim = strip_classifier(net)
    net.feat_dim, net.classifier_prefixes = dim, (f"{name}.",)
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
    """A student encoder for ``arch`` with its normalisation inside (ImageNet's; a timm model's own config)."""
    net = build_backbone(arch)
    norm = timm_mean_std(net) if is_timm_arch(canonical_arch(arch)) else (IMAGENET_MEAN, IMAGENET_STD)
    return Encoder(net, net.feat_dim, *norm)
