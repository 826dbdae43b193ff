"""Networks to evaluate: any student or teacher checkpoint as a frozen feature extractor.

``load_eval_model(weights, ...)`` reads (safely) this project's checkpoints (``ckpt_epoch_<N>.pth``,
``checkpoint_latest.pth``, ``student_backbone.pth``), the authors' released SimReg students, the
predecessor CompRess's students, any torchvision-named state dict and, through
:func:`models.teachers.load_teacher`, every teacher format. ``random_init_model(arch, seed)`` is the
untrained baseline. Both return an :class:`EvalModel` whose ``identity`` (the file's SHA-256 and what
was read from it) keys every cached feature and statistic, so a result is never computed from a stale
file. Every backbone key must be present and fit: nothing is left at random initialisation silently.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from models.backbones import (
    Encoder,
    build_encoder,
    canonical_arch,
    is_student_arch,
    is_timm_arch,
    resolve_student_arch,
    split_classifier,
)
from models.formats import FORMATS, Converted, convert, infer_arch
from models.frozen import FrozenExtractor
from models.io import CheckpointError, file_sha256, load_strict, safe_load
from models.schema import is_simreg_checkpoint
from models.simreg import HEAD_LAYOUTS, head_from_layout, parameter_layout
from models.teachers import load_teacher

log = logging.getLogger(__name__)

# Formats whose backbone is a registry student network (anything else is loaded as a teacher).
STUDENT_FORMATS = ("simreg", "simreg_original", "compress", "torchvision", "timm")


class EvalModel(FrozenExtractor):
    """A frozen network under evaluation: images in [0, 1] (B, 3, H, W) -> features (B, D) float32.

    ``encoder`` maps images to the backbone's pooled feature; with a ``head`` (``--use_pred``) the
    output is the prediction head's instead. ``identity`` keys every cached feature and statistic.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None, arch: str, identity: dict) -> None:
        super().__init__(encoder, head)
        self.arch = arch
        self.identity = identity
        self.fmt = identity.get("format", "")


# ---------------------------------------------------------------- prediction head from its weights
def head_layout(head_sd: dict[str, torch.Tensor]) -> int:
    """Which :data:`models.simreg.HEAD_LAYOUTS` entry a head state dict (paper indices) has; CheckpointError if none."""
    kinds = {}
    for key, value in head_sd.items():
        index, _, name = key.partition(".")
        if name == "weight" and index.isdigit():
            kinds[int(index)] = "linear" if value.ndim == 2 else "bn"
    found = tuple(sorted(kinds.items()))
    for layers in HEAD_LAYOUTS:
        if found == parameter_layout(layers):
            return layers
    raise CheckpointError(f"the prediction head's layers {found} match no known head layout (4, 2 or 0 layers)")


def build_head_from_weights(head_sd: dict[str, torch.Tensor], in_dim: int, path: str) -> nn.Module:
    """The prediction head (B, in_dim) -> (B, D) that ``head_sd`` was saved from, weights loaded."""
    layers = head_layout(head_sd)
    last = max(int(k.split(".")[0]) for k in head_sd)
    head = head_from_layout(HEAD_LAYOUTS[layers], in_dim, head_sd[f"{last}.weight"].shape[0])
    load_strict(head, head_sd, path, "prediction head")
    return head


def _student_layout(raw: object, path: str, fmt: str, arch: str | None) -> tuple[str, Converted]:
    """(format, converted) of a student file; ``timm/<name>`` students are read in timm's names."""
    if is_timm_arch(arch) and fmt in ("auto", "timm", "simreg"):
        return ("simreg" if is_simreg_checkpoint(raw) else "timm"), FORMATS["timm"].convert(raw)
    return convert(raw, fmt, path)


def split_student_backbone(raw: object, fmt: str, conv: Converted, backbone: nn.Module) -> tuple[dict, list[str]]:
    """The backbone weights for ``backbone`` and the classifier keys dropped: plain torchvision or timm names
    lose exactly the network's own classifier (``fc``, ``classifier.1``, ``classifier.3``, ``head``...)."""
    prefixes = getattr(backbone, "classifier_prefixes", ())
    if fmt in ("torchvision", "timm") and prefixes:
        sd = FORMATS["timm"].convert(raw).backbone  # the file's names, ``module.`` removed
        sd, dropped, _ = split_classifier(sd, prefixes)
        return sd, dropped
    return conv.backbone, []


def read_student_weights(path: str, backbone: nn.Module, arch: str) -> tuple[str, Converted]:
    """``--weights`` for a student ``backbone`` of ``arch``: (format, converted) with ``backbone`` holding
    exactly that network's weights (classifier keys dropped, listed in the log)."""
    raw = safe_load(path, "--weights")
    fmt, conv = _student_layout(raw, path, "auto", arch)
    conv.backbone, dropped = split_student_backbone(raw, fmt, conv, backbone)
    if dropped:
        log.info("--weights %s: dropped the classifier (%s)", path, ", ".join(dropped))
    return fmt, conv


# ---------------------------------------------------------------- entry points
def load_eval_model(
    weights: str,
    arch: str | None = None,
    fmt: str = "auto",
    use_pred: bool | int = False,
    as_teacher: bool = False,
    pool: str = "auto",
) -> EvalModel:
    """A frozen :class:`EvalModel` from any student or teacher checkpoint.

    Student layouts (:data:`STUDENT_FORMATS`) are loaded here, strictly; any other layout, an
    architecture only teachers have, or ``as_teacher=True`` goes through ``load_teacher`` so a teacher
    is evaluated with its own network and preprocessing. ``use_pred`` evaluates the prediction head's
    output with the head layout the file was trained with: ``True`` the (first) head, an int K >= 2
    the head of teacher K of a several-teacher student. ``pool``: a ViT teacher's feature (``--teacher_pool``).
    """
    snapshot = os.path.isdir(weights)  # a Hugging Face snapshot folder is a teacher (models/hf_checkpoints.py)
    if as_teacher or snapshot or not is_student_arch(arch) or fmt not in (*STUDENT_FORMATS, "auto"):
        return _teacher_model(weights, arch, fmt, use_pred, pool)
    raw = safe_load(weights, "--weights")
    fmt, conv = _student_layout(raw, weights, fmt, arch)
    if fmt not in STUDENT_FORMATS:  # auto-detected a teacher layout (MoCo, SwAV, a ViT, ...)
        return _teacher_model(weights, arch, fmt, use_pred, pool)
    return _student_model(weights, fmt, conv, arch, use_pred, raw)


def _teacher_model(weights: str, arch: str | None, fmt: str, use_pred: bool | int, pool: str = "auto") -> EvalModel:
    if use_pred:
        raise CheckpointError(f"--use_pred needs a student checkpoint with its prediction head; '{weights}' is not one")
    teacher = load_teacher(weights, arch, fmt, pool=pool)
    identity = _identity(weights, teacher.fmt, teacher.arch, "teacher", False)
    if teacher.pool:
        identity["pool"] = teacher.pool
    return EvalModel(teacher, None, teacher.arch, identity)


def _student_model(
    weights: str, fmt: str, conv: Converted, arch: str | None, use_pred: bool | int, raw: object
) -> EvalModel:
    if conv.unknown:
        raise CheckpointError(
            f"'{weights}' (format {fmt}) has {len(conv.unknown)} unrecognised key(s): {', '.join(conv.unknown[:8])}"
        )
    arch = resolve_student_arch(arch, conv.arch, infer_arch(conv.backbone), weights)
    encoder = build_encoder(arch)
    # A student's classifier (fc, classifier.1, head...) is never part of the evaluated backbone.
    backbone, _ = split_student_backbone(raw, fmt, conv, encoder.backbone)
    load_strict(encoder.backbone, backbone, weights, f"student {arch} backbone")
    head = _prediction_head(conv, use_pred, encoder.feat_dim, weights) if use_pred else None
    shown = "" if not use_pred else ", prediction head" + (f" {use_pred}" if use_pred is not True else "")
    log.info("evaluating %s (%s, format %s%s)", weights, arch, fmt, shown)
    identity = _identity(weights, fmt, arch, "student", use_pred)
    identity["epoch"] = conv.meta.get("epoch")
    if conv.meta.get("epochs"):  # a training checkpoint: how far its run had come, and at which crop size
        keys = ("epochs", "steps_into_next", "image_size", "knn_resize_size")
        identity["training"] = {k: conv.meta.get(k) for k in keys}
    return EvalModel(encoder, head, arch, identity)


def _prediction_head(conv: Converted, use_pred: bool | int, in_dim: int, weights: str) -> nn.Module:
    """Head 1 (``True``) or head K of the file, rebuilt in the layout it was trained with."""
    heads = conv.heads or ([conv.head] if conv.head else [])
    if not heads and conv.dense_heads:
        raise CheckpointError(
            f"'{weights}' was trained with --loss dense: it has no global prediction head (its dense heads map "
            "feature maps, not pooled features, and are not exported); evaluate or export its backbone without "
            "--use_pred / --with_head"
        )
    if not heads:
        raise CheckpointError(
            f"--use_pred: '{weights}' holds no prediction head (an exported backbone?); "
            "give a training checkpoint (ckpt_epoch_<N>.pth or checkpoint_latest.pth)"
        )
    k = 1 if use_pred is True else int(use_pred)
    if k > len(heads):
        raise CheckpointError(f"--head {k}: '{weights}' holds {len(heads)} prediction head(s), one per teacher")
    head = build_head_from_weights(heads[k - 1], in_dim, weights)
    recorded = conv.meta.get("n_mlp_layers")
    if recorded is not None and recorded != head_layout(heads[k - 1]):
        raise CheckpointError(f"'{weights}' says n_mlp_layers={recorded} but its head has another layout")
    return head


def _identity(weights: str, fmt: str, arch: str, kind: str, use_pred: bool | int) -> dict:
    return {
        "kind": kind,
        "weights": os.path.abspath(weights),
        "weights_sha256": file_sha256(weights),
        "format": fmt,
        "arch": arch,
        "use_pred": use_pred,
    }


def random_init_model(arch: str, seed: int = 0) -> EvalModel:
    """The untrained baseline: ``arch`` at torchvision's default initialisation, drawn with ``seed``."""
    arch = canonical_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder: Encoder = build_encoder(arch)
    identity = {
        "kind": "random_init",
        "weights_sha256": f"random_init:{arch}:seed{seed}:torch{torch.__version__}",
        "format": "random_init",
        "arch": arch,
        "use_pred": False,
        "epoch": 0,
    }
    return EvalModel(encoder, None, arch, identity)
