"""Frozen teachers: ``load_teacher(weights, arch=None, fmt="auto", use_fc=False)``.

A teacher maps float images in [0, 1], (B, 3, H, W), to pooled features (B, D) in float32. It
applies its own input normalisation (ImageNet mean/std, or none for SimCLR's TensorFlow weights),
stays in eval mode (BatchNorm on running statistics) whatever ``.train()`` is called with, and has no
parameter that requires a gradient.

Which network runs is decided by the architecture (``--arch_teacher``, or what the file holds) and the
checkpoint format together: BYOL's weights need the "SAME"-padding ``byol_resnet50``, SimCLR's the
widened ``resnet50x1/x2/x4``; plain torchvision names need the flag to tell those apart (README).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from models.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Encoder, build_backbone, canonical_arch
from models.formats import Converted, convert, infer_arch
from models.frozen import FrozenExtractor, out_dim
from models.io import CheckpointError, load_strict, safe_load
from models.resnet_same import byol_resnet50
from models.resnet_wide import wide_resnet50

log = logging.getLogger(__name__)

# The original release's teacher names that map onto a registry backbone.
TEACHER_ALIASES = {"sup_resnet50": "resnet50", "mobilenet": "mobilenet_v2"}

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


def teacher_arch_names() -> list[str]:
    """Every value --arch_teacher accepts."""
    return sorted(BACKBONES) + sorted(TEACHER_NETWORKS) + sorted(TEACHER_ALIASES)


def _layout(arch: str) -> str:
    return TEACHER_NETWORKS[arch][1] if arch in TEACHER_NETWORKS else arch


class Teacher(FrozenExtractor):
    """A frozen teacher. forward: (B, 3, H, W) in [0, 1] -> (B, feat_dim) float32.

    With a ``head`` (``--teacher_fc``) the output is the checkpoint's projection of the pooled feature.
    """

    def __init__(self, encoder: Encoder, arch: str, fmt: str, head: nn.Module | None = None) -> None:
        super().__init__(encoder, head)
        self.arch = arch
        self.fmt = fmt
        self.input_norm = "imagenet" if encoder.normalize.enabled else "none"

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Regression targets (B, D) for a batch; a cached teacher answers the same call from indices."""
        return self(images)


def resolve_teacher_arch(arch: str | None, found: str | None, path: str, fmt: str = "torchvision") -> str:
    """Reconcile --arch_teacher, the architecture the file holds and the network its format needs."""
    if arch is not None:
        arch = TEACHER_ALIASES.get(arch, arch)
        if arch not in TEACHER_NETWORKS and arch not in BACKBONES:
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


def _build_network(arch: str) -> nn.Module:
    """The teacher network on the meta device (no random init; the checkpoint's tensors are adopted)."""
    with torch.device("meta"):
        if arch in TEACHER_NETWORKS:
            return TEACHER_NETWORKS[arch][0]()
        return build_backbone(canonical_arch(arch))


def summarise(keys: list[str]) -> str:
    """Key names grouped by their first component (``encoder_k.* (320 keys), queue, encoder_q.fc.* (2 keys)``)."""
    groups: dict[str, list[list[str]]] = {}
    for k in keys:
        parts = k.split(".")
        groups.setdefault(parts[0], []).append(parts[1:])
    shown = []
    for first, rests in groups.items():
        seconds = {r[0] for r in rests if r}
        name = first if rests == [[]] else f"{first}.{seconds.pop()}.*" if len(seconds) == 1 else f"{first}.*"
        shown.append(name if len(rests) == 1 else f"{name} ({len(rests)} keys)")
    return ", ".join(shown)


def build_projection(sd: dict[str, torch.Tensor], path: str) -> nn.Module:
    """Rebuild a checkpoint's projection from its tensors: one Linear, or an indexed nn.Sequential.

    In every published layout the parameter-free gaps between stored indices are ReLUs (MoCo v2
    ``fc.0``/``fc.2``; SwAV, SimSiam, MoCo v3, Barlow Twins, VICReg, SimReg heads), and BatchNorms
    without ``weight`` are the non-affine ones (SimSiam, MoCo v3). Loaded strictly.
    """
    if "weight" in sd:
        head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0], bias="bias" in sd)
    else:
        try:
            indices = {int(k.split(".")[0]) for k in sd}
        except ValueError as exc:
            raise CheckpointError(f"--teacher_fc cannot rebuild the projection of '{path}' ({exc})") from exc
        layers = []
        for i in range(max(indices) + 1):
            p = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == str(i)}
            if not p:
                layers.append(nn.ReLU())
            elif "running_mean" in p:
                layers.append(nn.BatchNorm1d(p["running_mean"].shape[0], affine="weight" in p))
            elif "weight" in p and p["weight"].ndim == 2:
                layers.append(nn.Linear(p["weight"].shape[1], p["weight"].shape[0], bias="bias" in p))
            else:
                raise CheckpointError(f"--teacher_fc cannot rebuild layer {i} of the projection in '{path}'")
        head = nn.Sequential(*layers)
    load_strict(head, sd, path, "teacher projection")
    return head


def _projection_head(conv: Converted, fmt: str, path: str) -> nn.Module:
    if not conv.projection:
        raise CheckpointError(
            f"--teacher_fc: teacher '{path}' (format {fmt}) stores no projection head after the backbone; "
            "drop --teacher_fc to regress its pooled features"
        )
    head = build_projection(conv.projection, path)
    log.info("teacher_fc: regressing %s (%d-d) instead of the pooled feature", conv.projection_name, out_dim(head))
    return head


def load_teacher(weights: str, arch: str | None = None, fmt: str = "auto", use_fc: bool = False) -> Teacher:
    """Build the frozen teacher from a checkpoint file in any registered format.

    Every backbone key must be present and fit; keys the format recognises as non-backbone parts
    (projection heads, predictors, prototypes, momentum encoders, queues, classifiers) are dropped and
    listed in the log. ``use_fc``: output the checkpoint's projection (``--teacher_fc``) instead.
    """
    raw = safe_load(weights, "teacher")
    fmt, conv = convert(raw, fmt, weights, arch=TEACHER_ALIASES.get(arch, arch))
    if conv.unknown:
        shown = ", ".join(conv.unknown[:8])
        raise CheckpointError(
            f"teacher '{weights}' (format {fmt}) has {len(conv.unknown)} unrecognised key(s): {shown}"
        )
    arch = resolve_teacher_arch(arch, infer_arch(conv.backbone), weights, fmt)
    net = _build_network(arch)
    load_strict(net, conv.backbone, weights, f"teacher {arch}", assign=True)
    head = _projection_head(conv, fmt, weights) if use_fc else None
    if conv.dropped:
        log.info("teacher %s: dropped %d non-backbone key(s): %s", weights, len(conv.dropped), summarise(conv.dropped))
    norm = (IMAGENET_MEAN, IMAGENET_STD) if conv.input_norm == "imagenet" else (None, None)
    teacher = Teacher(Encoder(net, net.feat_dim, *norm), arch, fmt, head)
    log.info(
        "teacher: %s, format %s, %d-d %s, input %s, from %s",
        arch,
        fmt,
        teacher.feat_dim,
        "projections" if head is not None else "features",
        "ImageNet mean/std" if conv.input_norm == "imagenet" else "[0, 1] without mean/std",
        weights,
    )
    return teacher


class TeacherSet:
    """Several frozen teachers behind one call: ``targets(images, indices)`` -> [(B, D_k)], teacher by teacher.

    Each teacher (live or cached) keeps its own network, feature size and input preprocessing; in the
    single-view mode all of them see the same pixels. ``weights`` are the loss weights, normalised to
    sum to 1 (equal by default: the paper's plain average of the per-teacher losses).
    """

    def __init__(self, teachers: list, weights: list[float] | None = None) -> None:
        if len(teachers) < 2:
            raise ValueError("a TeacherSet holds two teachers or more; use the teacher itself for one")
        raw = list(weights) if weights is not None else [1.0] * len(teachers)
        if len(raw) != len(teachers) or min(raw) < 0 or sum(raw) <= 0:
            raise ValueError(f"loss weights {raw} do not fit {len(teachers)} teachers (non-negative, sum > 0)")
        self.teachers = teachers
        self.weights = [w / sum(raw) for w in raw]
        self.feat_dims = [t.feat_dim for t in teachers]

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """Every teacher's regression targets for the batch, in the order the teachers were given."""
        return [t.targets(images, indices) for t in self.teachers]
