"""Frozen teachers: ``load_teacher(weights, arch=None, fmt="auto", use_fc=False, pool="auto")``.

A teacher maps float images in [0, 1], (B, 3, H, W), to pooled features (B, D) in float32. It
applies its own input normalisation (ImageNet mean/std, none for SimCLR's TensorFlow weights, a timm
model's pretrained config), stays in eval mode (BatchNorm on running statistics) whatever ``.train()``
is called with, and has no parameter that requires a gradient.

Which network runs is decided by the architecture (``--arch_teacher``, or what the file holds) and the
checkpoint format together: BYOL's weights need the "SAME"-padding ``byol_resnet50``, SimCLR's the
widened ``resnet50x1/x2/x4``; plain torchvision names need the flag to tell those apart (docs/teachers.md). ViT
formats (DINO, DINOv2, DINOv3, MoCo v3) build the publisher's ViT from the file's shapes
(:mod:`models.vit`); ``timm/<name>`` builds timm's network and reads timm's names; a Hugging Face
snapshot (a folder with ``config.json``, or its weights file) builds the network its config describes,
exact to transformers' forward (:mod:`models.hf_layouts`, :mod:`models.hf_networks`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TEACHER_ALIASES,
    TIMM_PREFIX,
    Encoder,
    build_network,
    build_timm,
    is_timm_arch,
    resolve_teacher_arch,
    split_classifier,
    timm_mean_std,
)
from models.errors import UserError
from models.feature_maps import MapTap, probe_map
from models.formats import FORMATS, Converted, convert, detect_format, infer_arch
from models.frozen import FrozenExtractor, out_dim
from models.hf_checkpoints import read_weights
from models.hf_networks import load_hf_network
from models.io import CheckpointError, load_strict
from models.simreg import fp32_or_wider
from models.vit import POOLS, build_vit, check_patch_multiple, materialise
from models.vit_layouts import PUBLISHER

log = logging.getLogger(__name__)
DENSE_SOURCES = {  # where a teacher's dense targets come from, for the log
    "vit": "final-norm patch tokens of the last {n} block(s)",
    "torchvision_vit": "final-norm patch tokens",
    "pool_input": "the feature map its global pool reads",
    "module_output": "the feature map its global pool reads",
}


class Teacher(FrozenExtractor):
    """A frozen teacher. forward: (B, 3, H, W) in [0, 1] -> (B, feat_dim) float32.

    With a ``head`` (``--teacher_fc``) the output is the checkpoint's projection of the pooled feature.
    """

    def __init__(
        self, encoder: Encoder, arch: str, fmt: str, head: nn.Module | None = None, pool: str | None = None
    ) -> None:
        super().__init__(encoder, head)
        self.arch = arch
        self.fmt = fmt
        self.pool = pool  # a ViT's token pooling (cls, avg, cls+avg); None: the network's own pooled feature
        norm = encoder.normalize
        imagenet = norm.enabled and torch.allclose(norm.mean.flatten(), torch.tensor(IMAGENET_MEAN))
        self.input_norm = (
            "imagenet"
            if imagenet
            else "none"
            if not norm.enabled
            else "mean/std " + str(tuple(round(v, 4) for v in norm.mean.flatten().tolist()))
        )
        self.objective, self.tap, self.dense_dim, self.dense_grid = "global", None, 0, (0, 0)  # see use_objective

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Regression targets (B, D) for a batch; a cached teacher answers the same call from indices.

        After :meth:`use_objective` ``dense`` / ``both``: ``{"dense": (B, C, h, w)}`` (and ``"global": (B, D)``),
        both from one forward.
        """
        if self.objective == "global":
            return self(images)
        self.tap.start()
        pooled = self(images)
        dense = fp32_or_wider(self.tap.read())
        return {"dense": dense} if self.objective == "dense" else {"global": pooled, "dense": dense}

    def use_objective(self, objective: str, blocks: int = 1, image_size: int = 224) -> Teacher:
        """Give the targets of ``--loss objective``: the map of :mod:`models.feature_maps` (a ViT's final-norm
        patch tokens, ``blocks`` > 1 the last blocks' concatenated; a CNN's last feature map) alone or with
        the pooled feature. Sets ``dense_dim`` (C) and ``dense_grid`` (h, w) at ``image_size`` px."""
        self.objective = objective
        if objective == "global":
            return self
        self.tap = MapTap(self.encoder.backbone, blocks, name=f"teacher {self.arch}")
        self.dense_dim, *grid = probe_map(self.encoder, self.tap, self.encoder, image_size)
        self.dense_grid = tuple(grid)
        log.info("teacher %s: dense targets %d x %d x %d at %d px (%s)", self.arch, self.dense_dim, *self.dense_grid,
                 image_size, DENSE_SOURCES[self.tap.kind].format(n=blocks))  # fmt: skip
        return self

    def set_epoch(self, epoch: int) -> None:
        """The training loop's epoch: a live teacher computes every target afresh (a K-view cache picks a view)."""


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


def _cnn_network(conv: Converted, arch: str | None, path: str, fmt: str) -> tuple[nn.Module, str]:
    arch = resolve_teacher_arch(arch, infer_arch(conv.backbone), path, fmt)
    net = build_network(arch)
    load_strict(net, conv.backbone, path, f"teacher {arch}", assign=True)
    return net, arch


def _vit_network(conv: Converted, arch: str | None, path: str, fmt: str, pool: str) -> tuple[nn.Module, str]:
    """The publisher's ViT for the file's shapes, its weights adopted, at the pooling asked for."""
    spec = conv.meta["vit"]
    if arch and arch != spec.name:
        raise CheckpointError(
            f"teacher '{path}' holds a {PUBLISHER[spec.family]} {spec.name} (format {fmt}), but --arch_teacher is "
            f"{arch}; leave --arch_teacher unset (the file says what it holds)"
        )
    net = build_vit(spec, "cls" if pool == "auto" else pool)
    load_strict(net, conv.backbone, path, f"teacher {spec.name} ({PUBLISHER[spec.family]})", assign=True)
    materialise(net)
    if "rope_periods" in conv.meta:
        net.set_rope_periods(conv.meta["rope_periods"])
    return net, spec.name


def _timm_network(raw: object, arch: str | None, path: str) -> tuple[nn.Module, Converted]:
    """timm's network ``arch`` with the file's weights in timm's names (its classifier dropped, listed)."""
    if not is_timm_arch(arch):
        raise CheckpointError(f"--teacher_format timm reads timm's names: pass --arch_teacher {TIMM_PREFIX}<name>")
    net = build_timm(arch)
    conv = FORMATS["timm"].convert(raw)
    backbone, dropped, classifier = split_classifier(conv.backbone, net.classifier_prefixes)
    try:
        load_strict(net, backbone, path, f"teacher {arch}")
    except CheckpointError as exc:
        try:
            hint = f"; the file is a '{detect_format(raw, path)}' checkpoint: leave --arch_teacher unset to read it"
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"{exc}{hint}") from exc
    conv.dropped += dropped
    if conv.projection is None and classifier is not None:
        conv.projection, conv.projection_name = classifier, f"the classifier of {arch} (its logits)"
    return net, conv


def _network(raw: object, arch: str | None, fmt: str, path: str, pool: str) -> tuple[nn.Module, str, str, Converted]:
    """(network with the file's weights, its architecture name, the format, the converted file)."""
    if is_timm_arch(arch) or fmt == "timm":
        net, conv = _timm_network(raw, arch, path)
        if fmt == "auto":
            note_layout_overridden(raw, arch, path, timm_mean_std(net))
        fmt = "timm"
    else:
        fmt, conv = convert(raw, fmt, path, arch=TEACHER_ALIASES.get(arch, arch))
        if conv.unknown:
            n, shown = len(conv.unknown), ", ".join(conv.unknown[:8])
            raise CheckpointError(f"teacher '{path}' (format {fmt}) has {n} unrecognised key(s): {shown}")
        if "vit" in conv.meta:
            net, arch = _vit_network(conv, arch, path, fmt, pool)
            return net, arch, fmt, conv
        if "hf" in conv.meta:  # Hugging Face snapshots: models/hf_layouts.py, models/hf_networks.py
            net, arch = load_hf_network(conv.meta["hf"], arch, path, pool)
            return net, arch, fmt, conv
        net, arch = _cnn_network(conv, arch, path, fmt)
    if pool != "auto":
        raise UserError(
            f"--teacher_pool {pool} applies to ViT teachers (DINO, DINOv2, DINOv3, MoCo v3 files); teacher '{path}' "
            f"({arch}) gives its network's own pooled feature: drop --teacher_pool"
        )
    return net, arch, fmt, conv


def note_layout_overridden(raw: object, arch: str, path: str, timm_norm: tuple) -> None:
    """One line when ``--arch_teacher timm/<name>`` reads a file whose keys auto-detection reads as another
    layout (a DINO ViT's keys are timm's names): the name decides, with timm's preprocessing, not the layout's."""
    before = logging.root.manager.disable
    logging.disable(logging.INFO)  # the probe's own notes would describe a reading that does not happen
    try:
        fmt = detect_format(raw, path)
        if fmt in ("torchvision", "timm", "simreg", "huggingface"):  # plain names, or a distilled timm student
            return
        conv = FORMATS[fmt].convert(raw)
    except (CheckpointError, KeyError, AttributeError, TypeError):
        return
    finally:
        logging.disable(before)
    theirs = _norm_name(*_normalisation(None, conv, fmt))
    log.warning(
        "teacher '%s' has the key layout of a %s file (read as one: input %s); --arch_teacher %s reads it as timm's "
        "network with timm's preprocessing (input %s) - leave --arch_teacher unset to read it as %s",
        path, fmt, theirs, arch, _norm_name(*timm_norm), fmt,
    )  # fmt: skip


def _norm_name(mean, std) -> str:
    """``ImageNet mean/std``, ``[0, 1] without mean/std`` or ``mean (..) std (..)``."""
    if mean is None:
        return INPUT_NAMES["none"]
    if torch.allclose(torch.tensor(mean), torch.tensor(IMAGENET_MEAN)) and torch.allclose(
        torch.tensor(std), torch.tensor(IMAGENET_STD)
    ):
        return INPUT_NAMES["imagenet"]
    return f"mean {tuple(round(v, 4) for v in mean)} std {tuple(round(v, 4) for v in std)}"


def _normalisation(net: nn.Module, conv: Converted, fmt: str) -> tuple:
    if fmt == "timm":
        return timm_mean_std(net)
    if "hf" in conv.meta:  # preprocessor_config.json, or the model type's published mean/std
        return conv.meta["hf"].mean, conv.meta["hf"].std
    return (IMAGENET_MEAN, IMAGENET_STD) if conv.input_norm == "imagenet" else (None, None)


INPUT_NAMES = {"imagenet": "ImageNet mean/std", "none": "[0, 1] without mean/std"}


def check_input_size(teacher: nn.Module, size: int, what: str = "the crop size (--image_size / --crop_size)") -> None:
    """A UserError when a patch-based teacher cannot see ``size`` x ``size`` images whole."""
    backbone = teacher.encoder.backbone if hasattr(teacher, "encoder") else teacher
    patch = getattr(backbone, "patch", None) or getattr(backbone, "patch_size", None)
    if isinstance(patch, int):
        check_patch_multiple(size, size, patch, what)


def load_teacher(
    weights: str,
    arch: str | None = None,
    fmt: str = "auto",
    use_fc: bool = False,
    pool: str = "auto",
    input_size: int | None = None,
) -> Teacher:
    """Build the frozen teacher from a checkpoint file in any registered format, or a Hugging Face snapshot folder.

    Every backbone key must be present and fit; keys the format recognises as non-backbone parts
    (projection heads, predictors, prototypes, momentum encoders, queues, classifiers) are dropped and
    listed in the log. ``use_fc``: output the checkpoint's projection (``--teacher_fc``) instead.
    ``pool`` (ViT teachers): ``cls`` (the default, ``auto``), ``avg`` or ``cls+avg``. ``input_size``:
    refuse early a crop size the teacher's patch size does not divide.
    """
    if pool not in ("auto", *POOLS):
        raise UserError(f"--teacher_pool {pool!r}: choose auto, {', '.join(POOLS)}")
    arch = arch or None  # an empty --arch_teacher (run.sh's default) means: read it from the file
    net, arch, fmt, conv = _network(read_weights(weights, "teacher"), arch, fmt, weights, pool)
    vit_pool = getattr(net, "pool_mode", None)
    if use_fc and vit_pool not in (None, "cls", "head"):  # head: SigLIP's pooling, which no projection follows
        raise UserError(f"--teacher_fc projects the class token; it cannot follow --teacher_pool {pool}")
    head = _projection_head(conv, fmt, weights) if use_fc else None
    if conv.dropped:
        log.info("teacher %s: dropped %d non-backbone key(s): %s", weights, len(conv.dropped), summarise(conv.dropped))
    teacher = Teacher(Encoder(net, net.feat_dim, *_normalisation(net, conv, fmt)), arch, fmt, head, vit_pool)
    if input_size is not None:
        check_input_size(teacher, input_size)
    log.info(
        "teacher: %s, format %s, %d-d %s%s, input %s, from %s",
        arch,
        fmt,
        teacher.feat_dim,
        "projections" if head is not None else "features",
        f" ({vit_pool} pooling)" if vit_pool else "",
        INPUT_NAMES.get(teacher.input_norm, teacher.input_norm),
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
        self.dense_dims = [getattr(t, "dense_dim", 0) for t in teachers]
        self._weight_tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def weight_tensor(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The loss weights (K,) on ``device``, made once: the step uses them without a copy to the device."""
        key = (torch.device(device), dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self.weights, dtype=dtype).to(device)
        return self._weight_tensors[key]

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """Every teacher's regression targets for the batch, in the order the teachers were given."""
        return [t.targets(images, indices) for t in self.teachers]

    def read_ahead(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Each cached teacher reads a coming batch's rows ahead (a live teacher has nothing to read)."""
        return [x for t in self.teachers if hasattr(t, "read_ahead") for x in t.read_ahead(indices)]

    def set_epoch(self, epoch: int) -> None:
        """Passed to every teacher (a K-view cache picks the epoch's view; a live teacher ignores it)."""
        for t in self.teachers:
            t.set_epoch(epoch)
