"""The SimReg regression loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64: what autocast produced (bf16, fp16) goes up to fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||n(pred) - n(target)||^2 = 2 - 2 cos(pred, target).

    pred (B, D) is the head's output, target (B, D) the teacher feature; both are cast to fp32
    first, whatever autocast produced, so the loss and the normalisations are always fp32 (fp64 in a
    float64 run, ``train_student.py --float64``). Range [0, 4]; about 2 for unrelated vectors.
    """
    p = F.normalize(fp32_or_wider(pred), dim=1)
    t = F.normalize(fp32_or_wider(target), dim=1)
    return (2.0 - 2.0 * (p * t).sum(dim=1)).mean()


def multi_teacher_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[float]):
    """Several teachers at once: ``[sum_k w_k L_k, L_1, ..., L_K]`` as one (K + 1,) fp32 tensor.

    ``L_k = regression_loss(preds[k], targets[k])`` with pred k (B, D_k) from head k and target k (B, D_k)
    from teacher k; ``weights`` (K,) sum to 1 (the paper's plain average when equal). The first entry is
    what the step minimises; the others are logged per teacher.
    """
    per_teacher = torch.stack([regression_loss(p, t) for p, t in zip(preds, targets, strict=True)])
    w = torch.tensor(list(weights), dtype=per_teacher.dtype, device=per_teacher.device)
    return torch.cat([(w * per_teacher).sum().reshape(1), per_teacher])
