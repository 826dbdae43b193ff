"""Frozen teachers: ``load_teacher(weights, arch=None, fmt="auto")``.

A teacher maps float images in [0, 1], (B, 3, H, W), to pooled features (B, D) in float32. It
applies its own input normalisation, stays in eval mode (BatchNorm on running statistics) whatever
``.train()`` is called with, and has no parameter that requires a gradient.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from models.backbones import BACKBONES, Encoder, build_backbone, canonical_arch
from models.formats import CheckpointError, convert, infer_arch, load_strict, safe_load

log = logging.getLogger(__name__)

# The original release's teacher names that map onto a registry backbone.
TEACHER_ALIASES = {"sup_resnet50": "resnet50"}
# Teacher networks that need their own code (SimCLR widths, TF "SAME" padding).
PENDING_TEACHERS = ("resnet50x4", "resnet50x2", "resnet50x1", "byol_resnet50")


class Teacher(nn.Module):
    """A frozen feature extractor. forward: (B, 3, H, W) in [0, 1] -> (B, feat_dim) float32."""

    def __init__(self, encoder: Encoder, arch: str, fmt: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.feat_dim = encoder.feat_dim
        self.arch = arch
        self.fmt = fmt
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # The teacher is never trained: BatchNorm must keep using its running statistics even
        # when a parent module is switched to train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).float()

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Regression targets (B, D) for a batch; a cached teacher answers the same call from indices."""
        return self(images)


def resolve_teacher_arch(arch: str | None, found: str | None, path: str) -> str:
    """Reconcile --arch_teacher with the architecture the file holds; a contradiction is an error."""
    if arch is not None:
        arch = TEACHER_ALIASES.get(arch, arch)
        if arch in PENDING_TEACHERS:
            raise CheckpointError(f"teacher architecture '{arch}' is not available yet in this version")
        arch = canonical_arch(arch)
        if found is not None and found != arch:
            raise CheckpointError(
                f"teacher checkpoint '{path}' holds a {found}, but --arch_teacher is {arch}; "
                f"pass --arch_teacher {found} (or leave it unset to use the file's architecture)"
            )
        return arch
    if found is None:
        raise CheckpointError(
            f"could not tell the architecture of teacher '{path}'; pass --arch_teacher (one of {', '.join(BACKBONES)})"
        )
    return found


def load_teacher(weights: str, arch: str | None = None, fmt: str = "auto") -> Teacher:
    """Build the frozen teacher from a checkpoint file in any registered format.

    Every backbone key must be present and fit; keys the format recognises as non-backbone parts
    (projection heads, momentum encoders, queues, classifiers) are dropped and listed in the log.
    """
    raw = safe_load(weights, "teacher")
    fmt, conv = convert(raw, fmt, weights)
    if conv.unknown:
        shown = ", ".join(conv.unknown[:8])
        raise CheckpointError(
            f"teacher '{weights}' (format {fmt}) has {len(conv.unknown)} unrecognised key(s): {shown}"
        )
    found = infer_arch(conv.backbone)
    arch = resolve_teacher_arch(arch, found, weights)
    backbone = build_backbone(arch)
    load_strict(backbone, conv.backbone, weights, f"teacher {arch}")
    if conv.dropped:
        log.info(
            "teacher %s: dropped %d non-backbone key(s) (%s%s)",
            weights,
            len(conv.dropped),
            ", ".join(conv.dropped[:6]),
            " ..." if len(conv.dropped) > 6 else "",
        )
    log.info("teacher: %s, format %s, %d-d features, from %s", arch, fmt, backbone.feat_dim, weights)
    return Teacher(Encoder(backbone, backbone.feat_dim), arch, fmt)
