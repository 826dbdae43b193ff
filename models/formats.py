"""Checkpoint formats: safe reading, and a registry of layouts -> torchvision-named backbone weights.

Every file goes through :func:`safe_load` (``torch.load(weights_only=True)`` with an explicit
allow-list), so a checkpoint that needs arbitrary code to unpickle is refused, never run.
Each format turns the raw object into a :class:`Converted`: the backbone state dict, the keys it
recognised and deliberately dropped (projection heads, momentum encoders, queues, classifiers), and
the keys it did not recognise (an error for the caller to report).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with a message that names the file and the fix."""


# Old formats pickled an argparse.Namespace of their options: allowed by name, nothing else is.
SAFE_GLOBALS = [argparse.Namespace]


def safe_load(path: str, what: str = "checkpoint") -> object:
    """Read a PyTorch file with ``weights_only=True`` onto the CPU, or raise a clear CheckpointError."""
    if not path:
        raise CheckpointError(f"no {what} file was given")
    if not os.path.exists(path):
        raise CheckpointError(f"{what} file '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} path '{path}' is a folder; give the checkpoint file itself")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {what} '{path}': it needs arbitrary code to unpickle, which could run "
            f"commands on this machine ({first[:200]}); only weights files (tensors, dicts, numbers) "
            "are accepted - re-save it as a plain state dict from a trusted environment"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{what} '{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}"
        ) from exc


@dataclass
class Converted:
    """A checkpoint mapped to torchvision names."""

    backbone: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    head: dict[str, torch.Tensor] | None = None  # SimReg prediction head, paper indices
    arch: str | None = None  # architecture recorded in the file, if any
    meta: dict = field(default_factory=dict)


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


# ---------------------------------------------------------------- torchvision (plain names)
def _is_torchvision(raw: object) -> bool:
    sd = _strip_module(state_dict_of(raw))
    return "conv1.weight" in sd or "features.0.0.weight" in sd


def _convert_torchvision(raw: object) -> Converted:
    backbone, dropped = _drop_classifier(_strip_module(state_dict_of(raw)))
    arch = raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None
    return Converted(backbone, dropped, arch=arch)


# ---------------------------------------------------------------- MoCo v1 / v2 (official)
def _is_moco(raw: object) -> bool:
    return any(k.startswith("module.encoder_q.") for k in state_dict_of(raw))


def _convert_moco(raw: object) -> Converted:
    sd = state_dict_of(raw)
    kept, dropped, unknown = _split_prefix(sd, "module.encoder_q.", drop=("module.encoder_k.", "module.queue"))
    backbone, proj = _drop_classifier(kept, prefix="module.encoder_q.")
    arch = raw.get("arch") if isinstance(raw, dict) and isinstance(raw.get("arch"), str) else None
    projection = {k[len("fc.") :]: v for k, v in kept.items() if k.startswith("fc.")}
    return Converted(backbone, dropped + proj, unknown, arch=arch, meta={"projection": projection})


# ---------------------------------------------------------------- this project's checkpoints
def _is_simreg(raw: object) -> bool:
    return isinstance(raw, dict) and "version" in raw and isinstance(raw.get("student"), dict)


def _convert_simreg(raw: dict) -> Converted:
    args = raw.get("args") or {}
    return Converted(
        _tensors(raw["student"]),
        head=_tensors(raw.get("head")) or None,
        arch=args.get("arch_student"),
        meta={"n_mlp_layers": args.get("n_mlp_layers"), "epoch": raw.get("epoch")},
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
    )


@dataclass(frozen=True)
class Format:
    detect: Callable[[object], bool]
    convert: Callable[[object], Converted]
    description: str


# Order matters for auto-detection: the most specific layouts first, plain names last.
FORMATS: dict[str, Format] = {
    "simreg": Format(_is_simreg, _convert_simreg, "this project's training checkpoints"),
    "simreg_original": Format(_is_simreg_original, _convert_simreg_original, "the authors' released SimReg students"),
    "moco": Format(_is_moco, _convert_moco, "official MoCo v1/v2 (module.encoder_q.*)"),
    "torchvision": Format(_is_torchvision, _convert_torchvision, "plain torchvision names"),
}


def detect_format(raw: object, path: str = "") -> str:
    """The first registry format whose detector accepts ``raw``, or a CheckpointError."""
    for name, fmt in FORMATS.items():
        if fmt.detect(raw):
            return name
    keys = list(state_dict_of(raw))[:5] if state_dict_of(raw) else list(raw)[:5] if isinstance(raw, dict) else []
    raise CheckpointError(
        f"could not recognise the layout of '{path}' (first keys: {keys}); known formats: "
        + "; ".join(f"{n} ({f.description})" for n, f in FORMATS.items())
        + ". Name one with --teacher_format / --format if the file is one of them"
    )


def convert(raw: object, fmt: str = "auto", path: str = "") -> tuple[str, Converted]:
    """Detect (or take) the format and convert; returns (format name, Converted)."""
    if fmt == "auto":
        fmt = detect_format(raw, path)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format '{fmt}'; choose one of: auto, {', '.join(FORMATS)}")
    try:
        converted = FORMATS[fmt].convert(raw)
    except (KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"'{path}' is not a '{fmt}' checkpoint ({exc!r}); try --teacher_format auto") from exc
    if not converted.backbone:
        raise CheckpointError(f"'{path}' read as format '{fmt}' holds no backbone weights; is it the right file?")
    return fmt, converted


def _show(keys: list[str], n: int = 8) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """Load ``sd`` into ``module`` with every key accounted for, or raise a CheckpointError naming them."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(f"{what} weights in '{path}' are missing {len(missing)} key(s): {_show(missing)}")
    if unexpected:
        raise CheckpointError(
            f"{what} weights in '{path}' have {len(unexpected)} unexpected key(s): {_show(unexpected)}"
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{what} weights in '{path}' do not fit the network (file vs network): {_show(bad, 4)}")
    module.load_state_dict(sd, strict=True)


def infer_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """Guess the torchvision architecture from a torchvision-named state dict (None if unsure)."""
    if "features.0.0.weight" in sd:
        return "mobilenet_v2"
    if "conv1.weight" not in sd:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    n3 = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    if not bottleneck:
        return {2: "resnet18", 6: "resnet34"}.get(n3)
    if n3 == 6 and sd["layer1.0.conv1.weight"].shape[0] == 128:
        return "wide_resnet50_2"
    return {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(n3)
