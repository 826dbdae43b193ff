"""A distilled-student checkpoint without training (imported by the export, hub and embed tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.schema import training_state
from models.simreg import Student

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # images in [0, 1]


def write_student_checkpoint(
    path: str, arch: str = "resnet18", teacher_dim: int | Sequence[int] = 64, seed: int = 0
) -> Student:
    """A training checkpoint of this project (format ``simreg``) with non-trivial BatchNorm statistics;
    several ``teacher_dim`` give a several-teacher student (one head per teacher, ``heads``)."""
    torch.manual_seed(seed)
    student = Student(arch, teacher_dim, 4)
    for m in student.modules():  # eval-mode BatchNorm must matter
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = training_state(
        epoch=3, progress=None, identity={}, args={"arch_student": arch, "n_mlp_layers": 4},
        student=student.backbone_state_dict(), head=student.head.state_dict(), optimizer={}, scaler={}, rng={},
    )  # fmt: skip
    if len(student.heads) > 1:
        state["heads"] = [h.state_dict() for h in student.heads]
    torch.save(state, path)
    return student.eval()
