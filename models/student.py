"""The trainable part of distillation: student encoder plus prediction head(s) (what DDP wraps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones import build_encoder
from models.heads import build_head


class Student(nn.Module):
    """forward: images (B, 3, H, W) in [0, 1] -> head output (B, D_teacher).

    With several teachers (``teacher_dim`` a sequence of K sizes) there is one head per teacher on the
    shared backbone, each in the paper's layout, and forward returns the K outputs [(B, D_k)]; the
    backbone runs once per batch. ``head`` is the first teacher's head.
    """

    def __init__(self, arch: str, teacher_dim: int | Sequence[int], n_mlp_layers: int = 4) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = build_encoder(arch)
        dims = [teacher_dim] if isinstance(teacher_dim, int) else list(teacher_dim)
        self.heads = nn.ModuleList(build_head(self.encoder.feat_dim, d, n_mlp_layers) for d in dims)

    @property
    def head(self) -> nn.Module:
        return self.heads[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f = self.encoder(x)
        if len(self.heads) == 1:
            return self.heads[0](f)
        return [head(f) for head in self.heads]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights in its ecosystem's names (torchvision's or timm's), without the classifier."""
        return self.encoder.backbone.state_dict()
