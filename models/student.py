"""The trainable part of distillation: student encoder plus prediction head (what DDP wraps)."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import build_encoder
from models.heads import build_head


class Student(nn.Module):
    """forward: images (B, 3, H, W) in [0, 1] -> head output (B, D_teacher)."""

    def __init__(self, arch: str, teacher_dim: int, n_mlp_layers: int = 4) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = build_encoder(arch)
        self.head = build_head(self.encoder.feat_dim, teacher_dim, n_mlp_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights in its ecosystem's names (torchvision's or timm's), without the classifier."""
        return self.encoder.backbone.state_dict()
