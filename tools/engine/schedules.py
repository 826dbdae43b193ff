"""Learning-rate schedules."""

from __future__ import annotations

import math

import torch


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The paper's per-epoch cosine without warm-up; ``epoch`` is 1-based (1..epochs).

    lr(e) = base * 0.5 * (1 + cos(pi * (e - 1) / epochs)): the first epoch runs at ``base_lr``.
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
