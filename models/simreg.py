"""The SimReg method in one place: the student, its prediction head, the loss, and what one step computes.

A frozen teacher maps an image to a pooled feature (B, D) (:mod:`models.teachers`, or a feature cache:
:mod:`tools.teacher_cache.reader`). The student is a backbone (:mod:`models.backbones`) with a
prediction MLP on top (:func:`build_head`, dropped after training) that maps its feature (B, d) into the
teacher's space; it learns to minimise ||n(pred) - n(target)||^2 = 2 - 2 cos(pred, target)
(:func:`regression_loss`), both networks seeing the same crop in the paper's single-view mode
(``data.transforms.training_views``). Several teachers: one head each on the shared backbone, the loss
a weighted mean of theirs. :func:`distillation_losses` is what one training step computes; how the step
runs (device transfer, autocast, the optimizer) is :mod:`tools.engine.step`, and the loop, DDP and
compilation are ``train_student.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_encoder
from models.errors import UserError

# ============ the prediction head ============
HEAD_LAYERS = (0, 2, 4)  # what --n_mlp_layers builds
# Every head layout, its layers in order as (kind, in, out), sizes named "d" (the student's feature),
# "h" (2d) and "D" (the teacher's). A checkpoint stores parameters at the indices of its linear and bn
# layers; models/pretrained.py reads released heads by matching them against these layouts.
HEAD_LAYOUTS = {
    # The paper's: deliberately no BN/ReLU between the 2nd and 3rd linear, so parameters sit at indices
    # 0, 1, 3, 4, 5, 7 as in the authors' released checkpoints.
    4: (
        ("linear", "d", "h"),
        ("bn", "h"),
        ("relu",),
        ("linear", "h", "d"),
        ("linear", "d", "h"),
        ("bn", "h"),
        ("relu",),
        ("linear", "h", "D"),
    ),
    # The original built this without BN/ReLU (two stacked linears, i.e. one linear map); we build the
    # intended non-linear head.
    2: (("linear", "d", "h"), ("bn", "h"), ("relu",), ("linear", "h", "D")),
    # The linear predictor (it crashed in the original).
    0: (("bn", "d"), ("linear", "d", "D")),
    # The original's "2-layer" option as it was saved: read from released files, never built for training.
    -2: (("linear", "d", "h"), ("linear", "h", "D")),
}


def head_from_layout(layout: tuple, in_dim: int, out_dim: int) -> nn.Sequential:
    """The layers of a :data:`HEAD_LAYOUTS` entry for a student feature of ``in_dim``, a teacher's of ``out_dim``."""
    size = {"d": in_dim, "h": 2 * in_dim, "D": out_dim}
    build = {
        "linear": lambda a, b: nn.Linear(size[a], size[b]),
        "bn": lambda a: nn.BatchNorm1d(size[a]),
        "relu": lambda: nn.ReLU(inplace=True),
    }
    return nn.Sequential(*(build[kind](*sizes) for kind, *sizes in layout))


def parameter_layout(n_layers: int) -> tuple[tuple[int, str], ...]:
    """``((index, "linear" | "bn"), ...)``: where a head of this layout keeps its parameters."""
    return tuple((i, kind) for i, (kind, *_) in enumerate(HEAD_LAYOUTS[n_layers]) if kind != "relu")


def build_head(in_dim: int, out_dim: int, n_layers: int = 4) -> nn.Sequential:
    """Prediction head mapping the student feature (B, in_dim) to the teacher space (B, out_dim).

    - 4 (the paper): Linear(d,2d) BN ReLU Linear(2d,d) Linear(d,2d) BN ReLU Linear(2d,D);
    - 2: Linear(d,2d) BN ReLU Linear(2d,D);
    - 0: the linear predictor BN(d) Linear(d,D).
    """
    if n_layers not in HEAD_LAYERS:
        raise UserError(f"--n_mlp_layers must be one of {HEAD_LAYERS}, got {n_layers}")
    return head_from_layout(HEAD_LAYOUTS[n_layers], in_dim, out_dim)


# ============ the student ============
class Student(nn.Module):
    """The trainable part of distillation (what DDP wraps): images (B, 3, H, W) in [0, 1] -> (B, D_teacher).

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


# ============ the loss ============
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


def multi_teacher_loss(
    preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
):
    """Several teachers at once: ``[sum_k w_k L_k, L_1, ..., L_K]`` as one (K + 1,) fp32 tensor.

    ``L_k = regression_loss(preds[k], targets[k])`` with pred k (B, D_k) from head k and target k (B, D_k)
    from teacher k; ``weights`` (K,) sum to 1 (the paper's plain average when equal). The first entry is
    what the step minimises; the others are logged per teacher. The training step passes the weights as
    a tensor already on the device (:meth:`models.teachers.TeacherSet.weight_tensor`): a list would be
    copied to the device every step, and that copy waits for the queued work.
    """
    per_teacher = torch.stack([regression_loss(p, t) for p, t in zip(preds, targets, strict=True)])
    if isinstance(weights, torch.Tensor):
        w = weights.to(per_teacher.device, per_teacher.dtype)  # a no-op for the step's own tensor
    else:
        w = torch.tensor(list(weights), dtype=per_teacher.dtype, device=per_teacher.device)
    return torch.cat([(w * per_teacher).sum().reshape(1), per_teacher])


# ============ one step ============
def distillation_losses(
    student: nn.Module,
    teacher,
    x_student: torch.Tensor,
    x_teacher: torch.Tensor,
    index: torch.Tensor,
    forward_context: Callable = nullcontext,
) -> dict[str, torch.Tensor]:
    """What one SimReg step computes: ``{"loss": the loss to minimise}`` (and ``"per_teacher"`` (K,) for K > 1).

    ``x_student``, ``x_teacher``: float images in [0, 1] (B, 3, H, W) on the device, the same tensor in the
    single-view mode; ``index`` (B,) the samples' dataset indices (a cached teacher gathers its rows by
    them). ``teacher.targets(images, index)`` gives the targets (B, D), or one per teacher of a
    ``TeacherSet``, under inference mode (no autograd bookkeeping). ``forward_context()`` wraps both
    forwards (autocast, when the caller runs one); the loss is computed outside it, in fp32 or wider.
    """
    with torch.inference_mode(), forward_context():
        target = teacher.targets(x_teacher, index)
    several = isinstance(target, list)
    # an inference-mode tensor cannot be saved for the loss's backward
    target = [t.clone() for t in target] if several else target.clone()
    with forward_context():
        pred = student(x_student)
    if not several:
        return {"loss": regression_loss(pred, target)}
    weights = teacher.weight_tensor(pred[0].device, torch.promote_types(pred[0].dtype, torch.float32))
    losses = multi_teacher_loss(pred, target, weights)
    return {"loss": losses[0], "per_teacher": losses[1:]}
