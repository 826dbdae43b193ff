"""Checkpoint formats: a registry of published layouts -> backbone weights in their network's names.

CNN layouts map to torchvision's names; ViT layouts (DINO, DINOv2, DINOv3, MoCo v3; the mapping lives in
:mod:`models.vit_layouts`) to timm's, with the network's :class:`models.vit.ViTSpec` in ``meta["vit"]``;
``timm`` keeps timm's own names. Files are read by :func:`models.io.safe_load` (never running code);
each format turns the raw object into a :class:`Converted`: the backbone state dict, the keys it
recognised and deliberately dropped (projection heads, momentum encoders, queues, classifiers), and
the keys it did not recognise (an error for the caller to report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models import hf_layouts, vit_layouts
from models.io import CheckpointError, is_safetensors
from models.resnet_wide import tf_to_torchvision
from models.schema import is_simreg_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Converted:
    """A checkpoint mapped to torchvision names.

    ``projection`` holds the checkpoint's own output layers after the pooled feature (a projection MLP,
    or a classifier), keyed for an ``nn.Sequential`` (``0.weight``, ``1.running_mean``, ...) or a single
    Linear (``weight``, ``bias``); ``--teacher_fc`` uses them. ``input_norm`` is the preprocessing the
    network was trained with: ``imagenet`` (mean/std) or ``none`` (raw [0, 1] pixels).
    """

    backbone: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    head: dict[str, torch.Tensor] | None = None  # SimReg prediction head, paper indices
    heads: list[dict[str, torch.Tensor]] | None = None  # every head of a several-teacher SimReg student
    dense_heads: list[dict[str, torch.Tensor]] | None = None  # a --loss dense / both student's dense heads
    arch: str | None = None  # architecture recorded in the file, if any
    meta: dict = field(default_factory=dict)
    projection: dict[str, torch.Tensor] | None = None
    projection_name: str = ""
    input_norm: str = "imagenet"


def _tensors(obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def state_dict_of(raw: object) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: under ``state_dict`` / ``model`` / ``student``, or raw."""
    if isinstance(raw, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(raw.get(key), dict):
                return _tensors(raw[key])
    return _tensors(raw)


def _split_prefix(sd: dict, keep: str, drop: tuple[str, ...] = ()) -> tuple[dict, list, list]:
    """Keys under ``keep`` lose the prefix; keys under ``drop`` are dropped; the rest are unknown."""
    kept, dropped, unknown = {}, [], []
    for k, v in sd.items():
        if k.startswith(keep):
            kept[k[len(keep) :]] = v
        elif k.startswith(drop):
            dropped.append(k)
        else:
            unknown.append(k)
    return kept, dropped, unknown


CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def _drop_classifier(sd: dict, prefix: str = "") -> tuple[dict, list]:
    kept, dropped = {}, []
    for k, v in sd.items():
        (dropped.append(prefix + k) if k.startswith(CLASSIFIER_PREFIXES) else kept.__setitem__(k, v))
    return kept, dropped


def _strip_module(sd: dict) -> dict:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def _under(sd: dict, prefix: str) -> dict:
    """Entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _arch_of(raw: object) -> str | None:
    return raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None


def _encoder_with_fc(raw: object, keep: str, drop: tuple[str, ...], name: str) -> Converted:
    """Layouts that keep the backbone under ``keep`` with its projection MLP as ``fc`` (MoCo, SimSiam)."""
    kept, dropped, unknown = _split_prefix(_strip_module(state_dict_of(raw)), keep, drop)
    backbone, proj = _drop_classifier(kept, prefix=keep)
    projection = _under(kept, "fc.")
    return Converted(
        backbone, dropped + proj, unknown, arch=_arch_of(raw), projection=projection or None, projection_name=name
    )


# ---------------------------------------------------------------- plain torchvision names
# Supervised torchvision files, DINO / Barlow Twins / VICReg backbone releases, BYOL and SimCLR files
# converted to torchvision names all look alike: the format decides the preprocessing and network.
def _is_torchvision(raw: object) -> bool:
    sd = _strip_module(state_dict_of(raw))
    return "conv1.weight" in sd or "features.0.0.weight" in sd


def _plain(raw: object, input_norm: str = "imagenet") -> Converted:
    sd = _strip_module(state_dict_of(raw))
    backbone, dropped = _drop_classifier(sd)
    fc = _under(sd, "fc.") or _under(sd, "classifier.1.")  # ResNet fc; MobileNet-v2's (Dropout, Linear)
    return Converted(
        backbone,
        dropped,
        arch=_arch_of(raw),
        projection=fc or None,
        projection_name="the classifier stored with the backbone (its logits)",
        input_norm=input_norm,
    )


# ---------------------------------------------------------------- MoCo v1 / v2 (facebookresearch/moco)
def _is_moco(raw: object) -> bool:
    return any(k.startswith("encoder_q.") for k in _strip_module(state_dict_of(raw)))


def _convert_moco(raw: object) -> Converted:
    # v1: fc = Linear(2048, 128); v2: fc = Linear(2048, 2048), ReLU, Linear(2048, 128) -> fc.0 / fc.2
    return _encoder_with_fc(raw, "encoder_q.", ("encoder_k.", "queue"), "MoCo projection (encoder_q.fc)")


# ---------------------------------------------------------------- MoCo v3 (facebookresearch/moco-v3)
def _is_mocov3(raw: object) -> bool:
    return any(k.startswith("base_encoder.") for k in _strip_module(state_dict_of(raw)))


def _convert_mocov3(raw: object) -> Converted:
    if _vit_source(raw) is not None:  # --teacher_format mocov3 on a ViT file
        return _convert_vit(raw, "mocov3")
    # projector = base_encoder.fc (Linear, BN, ReLU, Linear, BN without affine); predictor dropped
    drop = ("momentum_encoder.", "predictor.")
    return _encoder_with_fc(raw, "base_encoder.", drop, "MoCo v3 projector (base_encoder.fc)")


# ---------------------------------------------------------------- SimSiam (facebookresearch/simsiam)
def _is_simsiam(raw: object) -> bool:
    return "encoder.conv1.weight" in _strip_module(state_dict_of(raw))


def _convert_simsiam(raw: object) -> Converted:
    return _encoder_with_fc(raw, "encoder.", ("predictor.",), "SimSiam projector (encoder.fc)")


# ---------------------------------------------------------------- SwAV (facebookresearch/swav)
SWAV_HEADS = ("projection_head.", "prototypes.")


def _is_swav(raw: object) -> bool:
    sd = _strip_module(state_dict_of(raw))
    return "conv1.weight" in sd and any(k.startswith(SWAV_HEADS) for k in sd)


def _convert_swav(raw: object) -> Converted:
    # The released file is a raw state dict with "module." names; SwAV's extra ConstantPad2d(1) plus
    # conv1 padding 2 equals torchvision's padding 3, so the backbone is a torchvision ResNet-50.
    sd = _strip_module(state_dict_of(raw))
    backbone = {k: v for k, v in sd.items() if not k.startswith(SWAV_HEADS)}
    dropped = [k for k in sd if k.startswith(SWAV_HEADS)]
    projection = _under(sd, "projection_head.")
    return Converted(backbone, dropped, projection=projection or None, projection_name="SwAV projection_head")


# ---------------------------------------------------------------- DINO (facebookresearch/dino)
def _dino_teacher(raw: object) -> dict | None:
    if isinstance(raw, dict) and isinstance(raw.get("teacher"), dict):
        sd = _strip_module(_tensors(raw["teacher"]))
        if any(k.startswith("backbone.") for k in sd):
            return sd
    return None


def _convert_dino(raw: object) -> Converted:
    if _vit_source(raw) is not None:  # --teacher_format dino on a ViT file
        return _convert_vit(raw, "dino")
    sd = _dino_teacher(raw)
    if sd is None:  # the backbone-only release: plain torchvision names, no fc
        return _plain(raw)
    # The full training checkpoint: DINO's own evaluation reads the EMA teacher, and so do we.
    backbone, dropped, unknown = _split_prefix(sd, "backbone.", drop=("head.",))
    backbone, fc = _drop_classifier(backbone, prefix="backbone.")
    return Converted(backbone, dropped + fc, unknown, meta={"checkpoint_key": "teacher"})


# ---------------------------------------------------------------- Barlow Twins / VICReg (facebookresearch)
def _is_backbone_projector(raw: object, with_bn: bool) -> bool:
    sd = _strip_module(state_dict_of(raw))
    has = lambda p: any(k.startswith(p) for k in sd)
    return has("backbone.") and has("projector.") and has("bn.") == with_bn


def _convert_backbone_projector(raw: object, name: str) -> Converted:
    sd = _strip_module(state_dict_of(raw))
    if not any(k.startswith("backbone.") for k in sd):  # the released resnet50.pth: a bare backbone
        return _plain(raw)
    backbone, dropped, unknown = _split_prefix(sd, "backbone.", drop=("projector.", "bn."))
    backbone, fc = _drop_classifier(backbone, prefix="backbone.")
    projection = _under(sd, "projector.")
    return Converted(backbone, dropped + fc, unknown, projection=projection or None, projection_name=name)


# ---------------------------------------------------------------- SimCLR v1 converted from TensorFlow
def _is_simclr_tf(raw: object) -> bool:
    sd = _strip_module(state_dict_of(raw))
    return "conv2d.weight" in sd and "batch_normalization.weight" in sd


def _convert_simclr(raw: object) -> Converted:
    sd = _strip_module(state_dict_of(raw))
    if "conv2d.weight" not in sd:  # converted with torchvision names (e.g. tonylins/simclr-converter)
        return _plain(raw, input_norm="none")
    table = tf_to_torchvision()
    backbone, unknown = {}, []
    for k, v in sd.items():
        layer, _, param = k.partition(".")
        if layer in table:
            backbone[f"{table[layer]}.{param}"] = v
        elif layer != "fc":
            unknown.append(k)
    fc = _under(sd, "fc.")
    dropped = [k for k in sd if k.startswith("fc.")]
    return Converted(
        backbone,
        dropped,
        unknown,
        projection=fc or None,
        projection_name="the supervised linear head fc stored with the SimCLR weights (logits)",
        input_norm="none",  # SimCLR (TensorFlow) was trained on [0, 1] pixels without mean/std
    )


# ---------------------------------------------------------------- this project's checkpoints
def _convert_simreg(raw: dict) -> Converted:
    settings = raw.get("args") or {}  # the run's arguments, saved as a dict
    head = _tensors(raw.get("head")) or None
    heads = [_tensors(h) for h in raw["heads"]] if isinstance(raw.get("heads"), list) else None
    dense = [_tensors(h) for h in raw["dense_heads"]] if isinstance(raw.get("dense_heads"), list) else None
    return Converted(
        _tensors(raw["student"]),
        head=head,
        heads=heads,
        dense_heads=dense,
        arch=settings.get("arch_student"),
        meta={
            "n_mlp_layers": settings.get("n_mlp_layers"),
            "epoch": raw.get("epoch"),
            "loss": settings.get("loss") or "global",
            "epochs": settings.get("epochs"),
            "steps_into_next": (raw.get("progress") or {}).get("step", 0),
            "image_size": settings.get("image_size"),  # what evaluation defaults to (tools/eval/common.py)
            "knn_resize_size": settings.get("knn_resize_size"),
        },
        projection=head,
        projection_name="the SimReg prediction head",
    )


# ---------------------------------------------------------------- the authors' released students
def _is_simreg_original(raw: object) -> bool:
    return any(k.startswith("encoder_q.module.") for k in state_dict_of(raw))


def _convert_simreg_original(raw: object) -> Converted:
    sd = state_dict_of(raw)
    backbone, dropped, unknown = _split_prefix(sd, "encoder_q.module.", drop=("encoder_t.",))
    head = {k[len("predict_q.module.") :]: v for k, v in sd.items() if k.startswith("predict_q.")}
    unknown = [k for k in unknown if not k.startswith("predict_q.module.")]
    opt = raw.get("opt") if isinstance(raw, dict) else None
    arch = getattr(opt, "arch_student", None)
    return Converted(
        backbone,
        dropped,
        unknown,
        head=head or None,
        arch=arch,
        meta={"epoch": raw.get("epoch") if isinstance(raw, dict) else None},
        projection=head or None,
        projection_name="the SimReg prediction head",
    )


# ---------------------------------------------------------------- the predecessor (CompRess) students
def _is_compress(raw: object) -> bool:
    """CompRess saved ``{'opt', 'model', 'optimizer', 'epoch'}``, ``model`` a DataParallel state dict."""
    if not (isinstance(raw, dict) and "opt" in raw and isinstance(raw.get("model"), dict)):
        return False
    return any(isinstance(k, str) and k.startswith("module.") for k in raw["model"])


def _convert_compress(raw: dict) -> Converted:
    conv = _plain(raw)  # torchvision names under module., fc dropped
    conv.arch = getattr(raw.get("opt"), "student_arch", None)
    conv.meta["epoch"] = raw.get("epoch")
    return conv


# ---------------------------------------------------------------- vision transformers (models/vit_layouts.py)
@dataclass
class _ViTSource:
    """Where a checkpoint keeps its ViT backbone, with the publisher's names."""

    sd: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    projection: dict[str, torch.Tensor] | None = None
    projection_name: str = ""
    family: str | None = None  # fixed by the layout (MoCo v3's base_encoder), else read from the keys
    plain: bool = False  # a bare ViT state dict (a timm file looks the same)


def _vit_source(raw: object) -> _ViTSource | None:
    """The ViT inside ``raw``: DINO's full checkpoint (EMA ``teacher.backbone.*``), MoCo v3's
    ``module.base_encoder.*`` (projector ``head``), or a plain ViT state dict; None for anything else."""
    teacher = _dino_teacher(raw)
    if teacher is not None:  # DINO / DINOv2 training checkpoints: the EMA teacher, as their evaluation reads
        backbone = vit_layouts.unchunk(_under(teacher, "backbone."))
        if not vit_layouts.is_vit(backbone):
            return None
        student = _tensors(raw.get("student")) if isinstance(raw, dict) else {}
        dropped = [f"teacher.{k}" for k in teacher if not k.startswith("backbone.")]
        return _ViTSource(backbone, dropped + [f"student.{k}" for k in student])
    sd = _strip_module(state_dict_of(raw))
    base = _under(sd, "base_encoder.")
    if vit_layouts.is_vit(base):
        kept, dropped, unknown = _split_prefix(sd, "base_encoder.", ("momentum_encoder.", "predictor."))
        head = _under(kept, "head.")
        backbone = {k: v for k, v in kept.items() if not k.startswith("head.")}
        name = "MoCo v3 projector (base_encoder.head: 3 Linear-BN layers)"
        return _ViTSource(backbone, dropped + [f"base_encoder.head.{k}" for k in head], unknown, head or None, name,
                          "mocov3")  # fmt: skip
    sd = vit_layouts.unchunk(sd)
    if not vit_layouts.is_vit(sd):
        return None
    head = _under(sd, "head.")  # a linear classifier (MoCo v3 main_lincls, DeiT-style files)
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    name = "the linear classifier stored with the ViT (head: its logits)"
    return _ViTSource(backbone, [f"head.{k}" for k in head], projection=head or None, projection_name=name, plain=True)


def _vit_family(raw: object) -> str | None:
    src = _vit_source(raw)
    return None if src is None else src.family or vit_layouts.family_of(src.sd)


def _convert_vit(raw: object, family: str) -> Converted:
    src = _vit_source(raw)
    if src is None:
        raise CheckpointError(f"it holds no ViT (cls_token, patch_embed, blocks) for a {family} format")
    spec = vit_layouts.vit_spec(src.sd, family)
    if src.plain and family == "dino":
        log.info(
            "a plain ViT state dict (timm-0.4 names): read as DINO's %s (ImageNet mean/std, %d heads); "
            "a timm model's file needs --arch_teacher timm/<name>",
            spec.name,
            spec.heads,
        )
    backbone, dropped = vit_layouts.to_timm(src.sd, family)
    meta = {"vit": spec}
    if "rope_embed.periods" in src.sd:
        meta["rope_periods"] = src.sd["rope_embed.periods"]
    return Converted(backbone, src.dropped + dropped, src.unknown, arch=spec.name, meta=meta,
                     projection=src.projection, projection_name=src.projection_name)  # fmt: skip


# ---------------------------------------------------------------- Hugging Face snapshots (models/hf_layouts.py)
def _convert_hf(raw: object) -> Converted:
    """A Hugging Face snapshot or bare weights file: the network and preprocessing travel in ``meta["hf"]``."""
    hf = hf_layouts.convert(raw)
    return Converted(hf.backbone, hf.dropped, hf.unknown, arch=hf.spec.name, meta={"hf": hf},
                     projection=hf.projection, projection_name=hf.projection_name)  # fmt: skip


# ---------------------------------------------------------------- timm models by name
def _convert_timm(raw: object) -> Converted:
    """timm's own names (``--arch_teacher timm/<name>``): the network decides which keys are its classifier."""
    if is_simreg_checkpoint(raw):  # a distilled timm student
        return _convert_simreg(raw)
    return Converted(_strip_module(state_dict_of(raw)))


@dataclass(frozen=True)
class Format:
    detect: Callable[[object], bool]
    convert: Callable[[object], Converted]
    description: str
    markers: tuple[str, ...] = ()  # key fragments typical of the layout (for "it resembles ...")


_never = lambda raw: False  # plain-name layouts that keys cannot tell apart: chosen by flag


def _vit_format(family: str, description: str, markers: tuple[str, ...]) -> Format:
    return Format(lambda raw: _vit_family(raw) == family, lambda raw: _convert_vit(raw, family), description, markers)


# Order matters for auto-detection: the most specific layouts first, plain names last.
FORMATS: dict[str, Format] = {
    "huggingface": Format(  # before every other layout: a snapshot folder is no dict of the others' names
        hf_layouts.is_hf,
        _convert_hf,
        "Hugging Face transformers snapshots (config.json + model.safetensors / shards / pytorch_model.bin, or a "
        "bare weights file): DINOv2 (with registers), DINOv3 ViT and ConvNeXt, CLIP, SigLIP, ViT",
        ("embeddings.patch_embeddings", "encoder.layer.0.attention", "vision_model.embeddings"),
    ),
    "simreg": Format(
        is_simreg_checkpoint, _convert_simreg, "this project's training checkpoints", ("student", "head", "version")
    ),
    "simreg_original": Format(
        _is_simreg_original,
        _convert_simreg_original,
        "the authors' released SimReg students (encoder_q.module.*)",
        ("encoder_q.module", "predict_q"),
    ),
    "compress": Format(
        _is_compress,
        _convert_compress,
        "the predecessor CompRess's students ({opt, model: module.<torchvision names>})",
        ("model", "module.layer1"),
    ),
    # ViTs before the ResNet layouts that share their wrappers (DINO's full checkpoint, MoCo v3's base_encoder)
    "dinov3": _vit_format(
        "dinov3",
        "DINOv3 ViT (storage_tokens, rope_embed.periods, LayerScale, masked key bias)",
        ("storage_tokens", "rope_embed", "ls1.gamma"),
    ),
    "dinov2": _vit_format(
        "dinov2",
        "DINOv2 ViT hub files (mask_token, LayerScale ls1/ls2, register_tokens in _reg4, SwiGLU w12/w3 in ViT-g)",
        ("mask_token", "ls1.gamma", "register_tokens"),
    ),
    "mocov3_vit": _vit_format(
        "mocov3",
        "MoCo v3 ViT (module.base_encoder.* with the projector in head, momentum_encoder, predictor; or a plain "
        "ViT with its fixed sin-cos pos_embed)",
        ("base_encoder.cls_token", "momentum_encoder"),
    ),
    "dino_vit": _vit_format(
        "dino",
        "DINO ViT: the backbone release (cls_token, pos_embed, blocks.*) or the full checkpoint (teacher.backbone.*)",
        ("cls_token", "pos_embed", "blocks.0.attn.qkv"),
    ),
    "dino": Format(
        lambda raw: _dino_teacher(raw) is not None,
        _convert_dino,
        "DINO ResNet-50: full checkpoint (teacher/student, module.backbone.*) or the backbone-only release",
        ("teacher", "backbone.", "head.last_layer"),
    ),
    "moco": Format(
        _is_moco, _convert_moco, "MoCo v1/v2 (module.encoder_q.*, encoder_k, queue)", ("encoder_q", "queue")
    ),
    "mocov3": Format(
        _is_mocov3,
        _convert_mocov3,
        "MoCo v3 ResNet-50 (module.base_encoder.*, momentum_encoder, predictor)",
        ("base_encoder", "momentum_encoder"),
    ),
    "simsiam": Format(
        _is_simsiam, _convert_simsiam, "SimSiam (module.encoder.*, predictor)", ("encoder.", "predictor")
    ),
    "swav": Format(
        _is_swav,
        _convert_swav,
        "SwAV / DeepCluster-v2 (module.<torchvision names>, projection_head, prototypes)",
        ("projection_head", "prototypes"),
    ),
    "barlowtwins": Format(
        lambda raw: _is_backbone_projector(raw, with_bn=True),
        lambda raw: _convert_backbone_projector(raw, "Barlow Twins projector"),
        "Barlow Twins: checkpoint.pth (module.backbone/projector/bn) or the released resnet50.pth",
        ("backbone.", "projector", "bn."),
    ),
    "vicreg": Format(
        lambda raw: _is_backbone_projector(raw, with_bn=False),
        lambda raw: _convert_backbone_projector(raw, "VICReg projector"),
        "VICReg: model.pth (module.backbone/projector) or the released resnet50.pth",
        ("backbone.", "projector"),
    ),
    "simclr": Format(
        _is_simclr_tf,
        _convert_simclr,
        "SimCLR v1 converted from TensorFlow: conv2d_N / batch_normalization_N names, or torchvision names",
        ("conv2d", "batch_normalization"),
    ),
    "byol": Format(
        _never,
        lambda raw: _plain(raw),
        "BYOL converted from JAX (torchvision names); runs on the SAME-padding byol_resnet50",
        (),
    ),
    "torchvision": Format(
        _is_torchvision, _plain, "plain torchvision names (supervised, exported students)", ("conv1.", "layer1.")
    ),
    "timm": Format(_never, _convert_timm, "timm's own names, with --arch_teacher / --arch timm/<name>", ()),
}

SIMCLR_ARCHS = ("resnet50x1", "resnet50x2", "resnet50x4")


def _refine_plain(raw: object, arch: str | None, path: str) -> str:
    """Plain torchvision names: the architecture flag or a SimCLR-wide stem decides the format."""
    if arch == "byol_resnet50":
        return "byol"
    if arch in SIMCLR_ARCHS:
        return "simclr"
    sd = _strip_module(state_dict_of(raw))
    stem = sd.get("conv1.weight")
    inner = sd.get("layer1.0.conv1.weight")
    if stem is not None and inner is not None and stem.shape[0] in (128, 256) and inner.shape[0] == stem.shape[0]:
        log.info(
            "'%s' holds a ResNet-50 widened %dx everywhere: read as SimCLR (no mean/std); "
            "pass --teacher_format vicreg for VICReg's wide ResNets",
            path,
            stem.shape[0] // 64,
        )
        return "simclr"
    log.info(
        "'%s' has plain torchvision names: read with ImageNet mean/std (supervised, DINO, Barlow Twins, VICReg); "
        "converted BYOL needs --arch_teacher byol_resnet50, SimCLR with torchvision names --teacher_format simclr",
        path,
    )
    return "torchvision"


def resembles(raw: object) -> list[str]:
    """Registry formats whose typical key fragments occur in ``raw``, best match first."""
    return [name for name, _ in resemblance(raw)]


def resemblance(raw: object) -> list[tuple[str, float]]:
    """(format, share of its typical key fragments found in ``raw``) for every format with any, best first."""
    keys = [str(k) for k in raw] if isinstance(raw, dict) else []
    keys += [str(k) for k in state_dict_of(raw)]
    scores = {}
    for name, fmt in FORMATS.items():
        hits = sum(any(m in k for k in keys) for m in fmt.markers)
        if hits:
            scores[name] = hits / len(fmt.markers)
    return sorted(scores.items(), key=lambda item: -item[1])


def detect_format(raw: object, path: str = "", arch: str | None = None) -> str:
    """The first registry format whose detector accepts ``raw``, or a CheckpointError.

    ``arch`` (the teacher architecture flag, if given) settles the plain-torchvision-name cases.
    """
    for name, fmt in FORMATS.items():
        if fmt.detect(raw):
            return _refine_plain(raw, arch, path) if name == "torchvision" else name
    sd = state_dict_of(raw)
    keys = list(sd) if sd else list(raw) if isinstance(raw, dict) else [type(raw).__name__]
    keys = [str(k) for k in keys if not str(k).endswith("num_batches_tracked")] or [str(k) for k in keys]
    shown = ", ".join(k[:40] for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    timm = "--arch_teacher timm/<name> (evaluation: --arch)"
    like = [name for name, score in resemblance(raw) if score >= 0.5][:1]
    if like and not is_safetensors(path):  # a strong resemblance is the likeliest fix
        fixes = f"it resembles {like[0]}: try --teacher_format {like[0]} (evaluation: --format); a timm model: {timm}"
    else:  # a .safetensors file, or no layout it resembles: most likely one of timm's networks
        fixes = f"a timm model's file needs its name: {timm}; another layout: --teacher_format NAME (see --help)"
    raise CheckpointError(f"could not recognise the layout of '{path}' (keys {shown}); {fixes}")


def convert(raw: object, fmt: str = "auto", path: str = "", arch: str | None = None) -> tuple[str, Converted]:
    """Detect (or take) the format and convert; returns (format name, Converted)."""
    if fmt == "auto":
        fmt = detect_format(raw, path, arch)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format '{fmt}'; choose one of: auto, {', '.join(FORMATS)}")
    if fmt != "huggingface" and hf_layouts.is_hf(raw):  # a snapshot named as a hub format: say what it is
        raise CheckpointError(
            f"'{path}' is a Hugging Face checkpoint, not a '{fmt}' file: pass --teacher_format auto (or huggingface)"
        )
    try:
        converted = FORMATS[fmt].convert(raw)
    except CheckpointError as exc:  # a layout's own sentence, about this file
        raise CheckpointError(f"'{path}' (format {fmt}): {exc}") from exc
    except (KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"'{path}' is not a '{fmt}' checkpoint ({exc!r}); try --teacher_format auto") from exc
    if not converted.backbone:
        like = [n for n in resembles(raw) if n != fmt][:3]
        hint = f" (it resembles: {', '.join(like)})" if like else ""
        raise CheckpointError(
            f"'{path}' read as format '{fmt}' holds no backbone weights{hint}; is it the right file or format?"
        )
    return fmt, converted


def infer_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """Guess the architecture from a torchvision-named state dict (None if unsure).

    ResNet-50s widened everywhere (SimCLR 2x/4x, stem 128/256 channels) are ``resnet50x2`` / ``resnet50x4``.
    """
    if "features.0.0.weight" in sd:  # MobileNet-v2's 19 feature blocks end in a 320 -> 1280 1x1 conv
        last = sd.get("features.18.0.weight")
        mbv2 = last is not None and tuple(last.shape) == (1280, 320, 1, 1) and "features.19.0.weight" not in sd
        return "mobilenet_v2" if mbv2 and "classifier.0.weight" not in sd else None
    if "conv1.weight" not in sd:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    n3 = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    if not bottleneck:
        return {2: "resnet18", 6: "resnet34"}.get(n3)
    stem, inner = sd["conv1.weight"].shape[0], sd["layer1.0.conv1.weight"].shape[0]
    if n3 == 6 and stem in (128, 256) and inner == stem:
        return f"resnet50x{stem // 64}"
    if n3 == 6 and stem == 64 and inner == 128:
        return "wide_resnet50_2"
    return {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(n3)
