"""The SimReg regression loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||n(pred) - n(target)||^2 = 2 - 2 cos(pred, target).

    pred (B, D) is the head's output, target (B, D) the teacher feature; both are cast to fp32
    first, whatever autocast produced, so the loss and the normalisations are always fp32.
    Range [0, 4]; about 2 for unrelated vectors.
    """
    p = F.normalize(pred.float(), dim=1)
    t = F.normalize(target.float(), dim=1)
    return (2.0 - 2.0 * (p * t).sum(dim=1)).mean()
