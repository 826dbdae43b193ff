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

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import build_encoder
from models.errors import UserError
from models.feature_maps import MapTap, probe_map

log = logging.getLogger(__name__)

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


def head_from_layout(layout: tuple, in_dim: int, out_dim: int, dense: bool = False) -> nn.Sequential:
    """The layers of a :data:`HEAD_LAYOUTS` entry for a student feature of ``in_dim``, a teacher's of ``out_dim``.

    ``dense``: the same layout on feature maps, each linear a 1x1 convolution and each BatchNorm1d a
    BatchNorm2d (statistics over images and locations), at the same indices.
    """
    size = {"d": in_dim, "h": 2 * in_dim, "D": out_dim}
    linear, bn = (lambda a, b: nn.Conv2d(a, b, 1), nn.BatchNorm2d) if dense else (nn.Linear, nn.BatchNorm1d)
    build = {
        "linear": lambda a, b: linear(size[a], size[b]),
        "bn": lambda a: bn(size[a]),
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


def build_dense_head(in_dim: int, out_dim: int, n_layers: int = 4) -> nn.Sequential:
    """The dense prediction head: the paper's head as 1x1 convolutions, (B, in_dim, h, w) -> (B, out_dim, h, w).

    4 layers: Conv(d,2d) BN2d ReLU Conv(2d,d) Conv(d,2d) BN2d ReLU Conv(2d,D), parameters at indices 0, 1, 3,
    4, 5, 7 as the global head; 2 and 0 (BN2d(d) Conv(d,D)) likewise. Dropped after training like it.
    """
    if n_layers not in HEAD_LAYERS:
        raise UserError(f"--n_mlp_layers must be one of {HEAD_LAYERS}, got {n_layers}")
    return head_from_layout(HEAD_LAYOUTS[n_layers], in_dim, out_dim, dense=True)


# ============ the student ============
OBJECTIVES = ("global", "dense", "both")  # what --loss regresses: pooled features, feature maps, or both


class Student(nn.Module):
    """The trainable part of distillation (what DDP wraps): images (B, 3, H, W) in [0, 1] -> (B, D_teacher).

    With several teachers (``teacher_dim`` a sequence of K sizes) there is one head per teacher on the
    shared backbone, each in the paper's layout, and forward returns the K outputs [(B, D_k)]; the
    backbone runs once per batch. ``head`` is the first teacher's head.

    ``objective`` ``dense`` or ``both`` (``--loss``): the backbone's last feature map (B, c, h, w), read
    during the same forward (:class:`models.feature_maps.MapTap`), goes through one dense head per
    teacher (:func:`build_dense_head`, output channels ``dense_dims[k]``), and forward returns
    ``{"dense": [(B, C_k, h, w)]}``, with ``"global": [(B, D_k)]`` from the global heads for ``both``
    (``dense`` builds no global head). ``image_size`` sizes the probe that finds the map's channels.
    """

    def __init__(
        self,
        arch: str,
        teacher_dim: int | Sequence[int],
        n_mlp_layers: int = 4,
        objective: str = "global",
        dense_dims: Sequence[int] = (),
        image_size: int = 224,
    ) -> None:
        super().__init__()
        self.arch, self.objective = arch, objective
        self.encoder = build_encoder(arch)
        dims = [teacher_dim] if isinstance(teacher_dim, int) else list(teacher_dim)
        if objective == "dense":
            dims = []
        self.heads = nn.ModuleList(build_head(self.encoder.feat_dim, d, n_mlp_layers) for d in dims)
        if objective != "global":
            self.tap = MapTap(self.encoder.backbone, name=arch)
            channels = dense_map_channels(self.encoder, self.tap, image_size, freeze_unused=objective == "dense")
            self.dense_heads = nn.ModuleList(build_dense_head(channels, d, n_mlp_layers) for d in dense_dims)

    @property
    def head(self) -> nn.Module:
        return self.heads[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | dict[str, list[torch.Tensor]]:
        if self.objective != "global":
            return self._forward_dense(x)
        f = self.encoder(x)
        if len(self.heads) == 1:
            return self.heads[0](f)
        return [head(f) for head in self.heads]

    def _forward_dense(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        self.tap.start()
        f = self.encoder(x)  # (B, d); the tap keeps the map it was pooled from
        fmap = self.tap.read()  # (B, c, h, w)
        out = {"dense": [head(fmap) for head in self.dense_heads]}
        if self.heads:
            out["global"] = [head(f) for head in self.heads]
        return out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights in its ecosystem's names (torchvision's or timm's), without the classifier."""
        return self.encoder.backbone.state_dict()


def dense_map_channels(encoder: nn.Module, tap: MapTap, image_size: int, freeze_unused: bool) -> int:
    """The channels of the map ``tap`` reads from ``encoder`` at ``image_size`` px (one probe forward in eval
    mode, so no BatchNorm statistic moves and no random number is drawn).

    ``freeze_unused`` (``--loss dense``): parameters that only act after the map (e.g. VGG's fc6/fc7, a
    ConvNeXt's final norm) get no gradient from the dense loss; they are frozen, so DDP does not wait for
    their gradients, and logged.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        channels, _, _ = probe_map(encoder, tap, encoder, image_size)
        if freeze_unused:
            ref = next(encoder.parameters())
            tap.start()
            with torch.enable_grad():
                encoder(torch.zeros(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype))
                used = torch.autograd.grad(
                    tap.read().sum(), [p for p in encoder.parameters() if p.requires_grad], allow_unused=True
                )
            params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
            unused = [n for (n, p), g in zip(params, used, strict=True) if g is None]
            for name, p in params:
                if name in unused:
                    p.requires_grad_(False)
            if unused:
                log.info("--loss dense: %d parameter(s) after the feature map get no gradient and stay as initialised "
                         "(%s)", len(unused), ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else ""))  # fmt: skip
    finally:
        encoder.train(was_training)
    return channels


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


def resample_grid(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Teacher maps (B, C, H, W) bilinearly resampled to the student's grid ``size`` = (h, w).

    The targets are resampled, not the student's map: they carry no gradient, so the student's cells are
    compared with what their area of the image holds and are never pushed to undo an interpolation of
    their own output; the loss is computed at the student's (usually coarser) grid, which is also where a
    cache can store the targets (``--cache_grid``). Shrinking is antialiased (every teacher token counts,
    no aliasing at factors beyond 2); an equal grid is returned as is.
    """
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    shrink = target.shape[-2] > size[0] or target.shape[-1] > size[1]
    return F.interpolate(target, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


def dense_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per location ||n(pred) - n(target)||^2 = 2 - 2 cos over channels, averaged over locations and images.

    pred (B, C, h, w) is the dense head's output, target (B, C, H, W) the teacher's map, resampled to
    (h, w) by :func:`resample_grid`; both cast to fp32 (or wider) first, as :func:`regression_loss`.
    """
    target = resample_grid(fp32_or_wider(target), pred.shape[-2:])
    p = F.normalize(fp32_or_wider(pred), dim=1)
    t = F.normalize(target, dim=1)
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
    dense_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """What one SimReg step computes: ``{"loss": the loss to minimise}`` (and ``"per_teacher"`` (K,) for K > 1).

    ``x_student``, ``x_teacher``: float images in [0, 1] (B, 3, H, W) on the device, the same tensor in the
    single-view mode; ``index`` (B,) the samples' dataset indices (a cached teacher gathers its rows by
    them). ``teacher.targets(images, index)`` gives the targets (B, D), or one per teacher of a
    ``TeacherSet``, under inference mode (no autograd bookkeeping). ``forward_context()`` wraps both
    forwards (autocast, when the caller runs one); the loss is computed outside it, in fp32 or wider.

    A student of the dense objectives returns a dict (:class:`Student`) and the teachers give
    ``{"dense": (B, C, H, W)[, "global": (B, D)]}``: see :func:`objective_losses` (``dense_weight``).
    """
    with torch.inference_mode(), forward_context():
        target = teacher.targets(x_teacher, index)
    several = isinstance(target, list)
    # an inference-mode tensor cannot be saved for the loss's backward
    target = [_clone(t) for t in target] if several else _clone(target)
    with forward_context():
        pred = student(x_student)
    if isinstance(pred, dict):
        weights = teacher.weight_tensor(x_student.device) if several else None
        return objective_losses(pred, target if several else [target], weights, dense_weight)
    if not several:
        return {"loss": regression_loss(pred, target)}
    weights = teacher.weight_tensor(pred[0].device, torch.promote_types(pred[0].dtype, torch.float32))
    losses = multi_teacher_loss(pred, target, weights)
    return {"loss": losses[0], "per_teacher": losses[1:]}


def _clone(target: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in target.items()} if isinstance(target, dict) else target.clone()


def objective_losses(
    pred: dict[str, list[torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None, dense_weight: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The dense objectives over K teachers: per teacher ``L_k = dense_k`` (``--loss dense``) or
    ``L_k = global_k + dense_weight * dense_k`` (``both``), the loss ``sum_k w_k L_k``.

    ``pred``: the student's ``{"dense": [(B, C_k, h, w)], "global": [(B, D_k)]}``; ``targets[k]``: teacher k's
    ``{"dense": (B, C_k, H_k, W_k), "global": (B, D_k)}``; ``weights`` (K,) (None: one teacher, weight 1).
    Returns ``{"loss"}``, ``"per_teacher"`` (K,) when
    K > 1, and for ``both`` the weighted ``"global"`` and ``"dense"`` terms (logged apart).
    """
    dense = torch.stack([dense_loss(p, t["dense"]) for p, t in zip(pred["dense"], targets, strict=True)])
    if weights is None:  # one teacher: made on the device, no copy from the host in the step
        w = torch.ones(len(targets), dtype=dense.dtype, device=dense.device)
    elif isinstance(weights, torch.Tensor):  # the step's own tensor, already on the device (TeacherSet.weight_tensor)
        w = weights.to(dense.device, dense.dtype)
    else:
        w = torch.tensor(list(weights), dtype=dense.dtype, device=dense.device)
    out: dict[str, torch.Tensor] = {}
    if "global" in pred:
        glob = torch.stack([regression_loss(p, t["global"]) for p, t in zip(pred["global"], targets, strict=True)])
        per_teacher = glob + dense_weight * dense
        parts = {"global": (w * glob).sum(), "dense": (w * dense).sum()}
    else:
        per_teacher, parts = dense, {}
    out["loss"] = (w * per_teacher).sum()
    if len(targets) > 1:
        out["per_teacher"] = per_teacher
    return {**out, **parts}


def loss_names(n_teachers: int, objective: str = "global") -> list[str]:
    """The names of the entries of a step's loss vector (``tools.engine.step.distill_step``), in order."""
    names = ["loss"] + [f"loss_teacher_{k}" for k in range(1, n_teachers + 1) if n_teachers > 1]
    return names + (["loss_global", "loss_dense"] if objective == "both" else [])
