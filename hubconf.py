"""torch.hub entry points: a distilled student or any supported teacher from a local checkpoint file.

    import torch
    model = torch.hub.load("/path/to/simreg", "student", source="local", weights="ckpt_epoch_130.pth")
    feats = model(images)  # float images in [0, 1], (B, 3, H, W) -> (B, D) float32; normalised inside
    teacher = torch.hub.load("/path/to/simreg", "teacher", source="local", weights="moco_v2_800ep_pretrain.pth.tar")

Nothing is ever downloaded: ``weights`` must be a file on this machine (a URL is refused). The
networks come back frozen and in eval mode, exactly as ``eval_knn.py`` evaluates them.
"""

from __future__ import annotations

from models.errors import UserError
from models.pretrained import EvalModel, load_eval_model
from models.teachers import Teacher, load_teacher

dependencies = ["torch", "torchvision", "numpy"]


def _local_file(weights: str | None) -> str:
    if not weights:
        raise UserError("give the checkpoint as weights=FILE (a local file: nothing is downloaded)")
    if "://" in str(weights):
        raise UserError(
            f"weights='{weights}' is a URL; this hub entry never downloads: fetch the file yourself and pass its path"
        )
    return str(weights)


def student(
    weights: str | None = None, arch: str | None = None, fmt: str = "auto", head: int | None = None, pool: str = "auto"
) -> EvalModel:
    """The evaluated backbone of any checkpoint ``eval_knn.py`` reads: images in [0, 1] -> (B, D) features.

    ``arch`` / ``fmt`` / ``pool`` as ``--arch`` / ``--format`` / ``--teacher_pool``; ``head=K`` gives the
    prediction head's output instead (K = 1 for a one-teacher student, teacher K's head for a several-teacher one).
    """
    if head is not None and (not isinstance(head, int) or head < 1):
        raise UserError(f"head={head!r}: give the 1-based number of a prediction head, or None for the backbone")
    use_pred = False if head is None else True if head == 1 else head
    return load_eval_model(_local_file(weights), arch, fmt, use_pred, pool=pool)


def teacher(
    weights: str | None = None, arch: str | None = None, fmt: str = "auto", use_fc: bool = False, pool: str = "auto"
) -> Teacher:
    """Any supported teacher file as the frozen network distillation runs: images in [0, 1] -> (B, D).

    ``arch`` / ``fmt`` / ``use_fc`` / ``pool`` as ``--arch_teacher`` / ``--teacher_format`` / ``--teacher_fc``
    / ``--teacher_pool``.
    """
    return load_teacher(_local_file(weights), arch, fmt, use_fc=use_fc, pool=pool)
