"""Networks by name: the one place where an architecture's name becomes a network, students and teachers alike.

- Students (and most teachers): every torchvision classification model, its classifier (the last
  ``nn.Linear``: ``fc``, ``classifier.1``, ``heads.head``...) replaced by the identity, so an exported
  state dict loads into ``torchvision.models.<arch>()`` with only the classifier missing; the feature
  size is that Linear's input size, read from the model.
- ``timm/<name>`` (or ``timm/<name>.<pretrained tag>``): timm's network, built with
  ``timm.create_model(name, pretrained=False, num_classes=0)``: nothing is downloaded, ever; weights come
  from a local file in timm's own names. The feature is timm's pooled pre-logits output, the input
  normalisation the mean/std of the model's pretrained config (shipped inside timm). ViT-family models
  are built with ``dynamic_img_size=True`` so they take the training crop size (their state dict is
  unchanged: an exported student loads strictly into ``timm.create_model(name, num_classes=0)``).
- Teacher networks beyond those (:data:`TEACHER_NETWORKS`): SimCLR's widened ResNet-50s and BYOL's
  "SAME"-padding ResNet-50, chosen by a checkpoint's format and key layout (:func:`resolve_teacher_arch`);
  ViT teachers are built from a file's shapes instead (:mod:`models.vit`).

:func:`canonical_arch` resolves a student name, :func:`resolve_student_arch` and
:func:`resolve_teacher_arch` reconcile a flag with what a file holds, :func:`build_backbone` and
:func:`build_network` build. Every backbone maps a normalised image batch (B, 3, H, W) to its pooled
feature (B, D); :class:`Encoder` puts the network's own normalisation in front, for images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from models.errors import UserError
from models.io import CheckpointError
from models.resnet_same import byol_resnet50
from models.resnet_wide import wide_resnet50

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ============ the names ============
# Every torchvision classification model (squeezenet has a convolutional classifier: no linear feature).
BACKBONES: tuple[str, ...] = tuple(
    n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith("squeezenet")
)
TIMM_PREFIX = "timm/"
# The original release's names for the same networks.
ALIASES = {"mobilenet": "mobilenet_v2"}
TEACHER_ALIASES = {"sup_resnet50": "resnet50", "mobilenet": "mobilenet_v2"}
# Networks whose auxiliary training heads would make forward() return a tuple in train mode.
NO_AUX = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}
# Teacher networks beyond the student registry: name -> (builder, the torchvision layout of its keys).
TEACHER_NETWORKS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet50x1": (lambda: wide_resnet50(1), "resnet50"),  # SimCLR 1x: a ResNet-50 fed [0, 1] pixels
    "resnet50x2": (lambda: wide_resnet50(2), "resnet50x2"),
    "resnet50x4": (lambda: wide_resnet50(4), "resnet50x4"),
    "byol_resnet50": (byol_resnet50, "resnet50"),  # TensorFlow "SAME" padding
}
# Formats whose weights need a particular network for a key layout: format -> {layout: network}.
FORMAT_NETWORKS = {
    "byol": {"resnet50": "byol_resnet50"},
    "simclr": {"resnet50": "resnet50x1", "resnet50x2": "resnet50x2", "resnet50x4": "resnet50x4"},
}


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


def is_student_arch(arch: str | None) -> bool:
    """True for registry backbones (and their aliases); other names (e.g. resnet50x4) are teachers."""
    if arch is None:
        return True
    arch = TEACHER_ALIASES.get(arch, arch)
    return arch in BACKBONES or arch in ALIASES or is_timm_arch(arch)


def resolve_student_arch(given: str | None, recorded: str | None, found: str | None, path: str) -> str:
    """The student architecture to build for a file: ``--arch`` must agree with the weights' shapes (``found``).

    A recorded ``timm/<name>`` wins over shapes that merely look like a torchvision network (timm's
    ResNets share torchvision's names).
    """
    given = canonical_arch(TEACHER_ALIASES.get(given, given)) if given else None
    if is_timm_arch(given) or (given is None and is_timm_arch(recorded)):
        return given or canonical_arch(recorded)
    if given and found and given != found:
        raise CheckpointError(f"'{path}' holds a {found} backbone, but --arch is {given}; pass --arch {found}")
    arch = given or found
    if arch is None and recorded:
        arch = canonical_arch(recorded)
    if arch is None:
        raise CheckpointError(
            f"could not tell the architecture of '{path}'; pass --arch (a torchvision classification model, e.g. "
            f"{', '.join(BACKBONES[:4])}, ..., or {TIMM_PREFIX}<name>)"
        )
    return arch


def teacher_arch_names() -> list[str]:
    """What --arch_teacher accepts: any torchvision classification model, timm/<name>, the wide and SAME-padding
    ResNets and the original's names (ViT formats need none: the file says what it holds)."""
    shown = ["resnet50 (or any torchvision classification model)", f"{TIMM_PREFIX}<name> (any timm model)"]
    return shown + sorted(TEACHER_NETWORKS) + sorted(TEACHER_ALIASES)


def _layout(arch: str) -> str:
    return TEACHER_NETWORKS[arch][1] if arch in TEACHER_NETWORKS else arch


def resolve_teacher_arch(arch: str | None, found: str | None, path: str, fmt: str = "torchvision") -> str:
    """Reconcile --arch_teacher, the architecture the file holds and the network its format needs."""
    if arch is not None:
        arch = TEACHER_ALIASES.get(arch, arch)
        if arch not in TEACHER_NETWORKS and arch not in BACKBONES and not is_timm_arch(arch):
            raise CheckpointError(
                f"unknown teacher architecture '{arch}'; choose one of: {', '.join(teacher_arch_names())}"
            )
        if found is not None and _layout(arch) != found:
            raise CheckpointError(
                f"teacher checkpoint '{path}' holds a {found}, but --arch_teacher is {arch}; "
                f"pass --arch_teacher {found} (or leave it unset to use the file's architecture)"
            )
    elif found is None:
        raise CheckpointError(
            f"could not tell the architecture of teacher '{path}'; pass --arch_teacher "
            f"(one of {', '.join(teacher_arch_names())})"
        )
    need = FORMAT_NETWORKS.get(fmt, {}).get(_layout(arch or found))
    if fmt == "byol" and arch is not None and arch != need:
        raise CheckpointError(
            f"BYOL weights '{path}' need TensorFlow 'SAME' padding: pass --arch_teacher byol_resnet50 (or leave it "
            f"unset); on {arch}'s symmetric padding they lose about 4.6 points of accuracy"
        )
    return need or arch or found


def build_network(arch: str) -> nn.Module:
    """A teacher network on the meta device (no random init; the checkpoint's tensors are adopted)."""
    with torch.device("meta"):
        if arch in TEACHER_NETWORKS:
            return TEACHER_NETWORKS[arch][0]()
        try:
            return build_backbone(canonical_arch(arch))
        except NotImplementedError:  # a constructor that computes from its initial weights (RegNet)
            pass
    return build_backbone(canonical_arch(arch))


# ============ building a backbone ============
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


def innermost_encoder(model: nn.Module) -> Encoder:
    """The :class:`Encoder` (normalisation + backbone) inside a student, a teacher or an evaluated network."""
    module = model
    while not isinstance(module, Encoder):
        module = getattr(module, "encoder", None)
        if module is None:
            raise UserError(f"{type(model).__name__} has no backbone encoder")
    return module


def build_encoder(arch: str) -> Encoder:
    """A student encoder for ``arch`` with its normalisation inside (ImageNet's; a timm model's own config)."""
    net = build_backbone(arch)
    norm = timm_mean_std(net) if is_timm_arch(canonical_arch(arch)) else (IMAGENET_MEAN, IMAGENET_STD)
    return Encoder(net, net.feat_dim, *norm)
