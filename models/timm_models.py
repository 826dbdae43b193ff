"""timm models by name: ``timm/<name>`` (or ``timm/<name>.<pretrained tag>``), students and teachers alike.

Built with ``timm.create_model(name, pretrained=False, num_classes=0)``: nothing is downloaded, ever;
weights come from a local ``.pth`` / ``.safetensors`` file in timm's own names, with or without the
classifier. The feature is timm's pooled pre-logits output (B, ``feat_dim``), the input normalisation the
mean/std of the model's pretrained config (a config shipped inside timm, not a download). ViT-family
models are built with ``dynamic_img_size=True`` so they take the training crop size: their state dict
is unchanged (timm resamples the stored position embedding on the fly, its own way), so an exported
student loads strictly into ``timm.create_model(name, num_classes=0)``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.errors import UserError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"


def is_timm_arch(arch: str | None) -> bool:
    """True for ``timm/<name>`` architecture names."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    """``timm/<name>[.<tag>]`` -> ``<name>[.<tag>]``, or a UserError when timm has no such model."""
    import timm

    name = arch[len(TIMM_PREFIX) :]
    if not name or not timm.is_model(name):
        like = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5] if name else []
        hint = f" (similar: {', '.join(like)})" if like else ""
        raise UserError(f"'{arch}' is not a timm model{hint}; see timm.list_models() for the names")
    return name


def build_timm(arch: str) -> nn.Module:
    """The timm network ``arch`` without classifier: normalised (B, 3, H, W) -> pooled (B, ``feat_dim``).

    Attributes: ``feat_dim``, ``classifier_prefixes`` (the key prefixes of the removed classifier, from
    the pretrained config) and ``patch_size`` (for patch-embedding models, else None).
    """
    import timm

    name = timm_name(arch)
    try:  # ViT-family models take any multiple of their patch size; CNNs do not know the argument
        net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:
        net = timm.create_model(name, pretrained=False, num_classes=0)
    net.feat_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    clf = net.pretrained_cfg.get("classifier") or ()
    net.classifier_prefixes = tuple(f"{c}." for c in ((clf,) if isinstance(clf, str) else clf))
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    net.patch_size = int(patch[0]) if isinstance(patch, (tuple, list)) else patch
    return net


def timm_mean_std(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std of the model's pretrained config (ImageNet's, or e.g. 0.5 for AugReg ViTs)."""
    cfg = net.pretrained_cfg
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def split_classifier(
    sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor] | None]:
    """(backbone weights, dropped classifier keys, the classifier as ``{weight, bias}`` when it is one Linear).

    ``prefixes``: the classifier's key prefixes (``head.``, ``fc.``, ``classifier.``, ``head.fc.``...);
    a file without them (saved with ``num_classes=0``) loses nothing.
    """
    backbone = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    dropped = [k for k in sd if k.startswith(prefixes)]
    first = {k[len(prefixes[0]) :]: v for k, v in sd.items() if prefixes and k.startswith(prefixes[0])}
    linear = first if set(first) in ({"weight"}, {"weight", "bias"}) and first["weight"].ndim == 2 else None
    return backbone, dropped, linear
