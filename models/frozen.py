"""The one freeze helper: a feature extractor that stays in eval mode and never takes a gradient."""

from __future__ import annotations

import torch
from torch import nn

from models.simreg import fp32_or_wider


def out_dim(head: nn.Module) -> int:
    """Output size of a head: the ``out_features`` of its last Linear."""
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features


class FrozenExtractor(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> features (B, feat_dim) float32 (float64 for a float64 network).

    ``encoder`` maps images to a pooled feature (it has ``feat_dim``); with a ``head`` the output is the
    head's instead (a teacher's projection, a student's prediction head). No parameter requires a
    gradient, and the module stays in eval mode (BatchNorm on running statistics) whatever ``.train()``
    a parent calls: teachers are never trained and evaluation protocols freeze the backbone (MoCo's
    linear classification does the same).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.feat_dim = out_dim(head) if head is not None else encoder.feat_dim
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        return fp32_or_wider(self.head(f) if self.head is not None else f)
