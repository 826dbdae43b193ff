"""What a training run saves and restores: its identity, resume, checkpoints and the exported backbone.

A run is identified by its data (the dataset fingerprint), its teacher and its student; resuming a
checkpoint of another run is refused with a sentence naming the difference (raising ``--epochs`` is
fine). Checkpoints follow :mod:`models.schema` and are written atomically by rank 0; the one they
replace is kept as the fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass

import torch

from models.errors import UserError
from models.io import atomic_save, differences, file_sha256, load_strict
from models.pretrained import read_student_weights
from models.schema import training_state
from models.simreg import Student
from tools.engine import distributed
from tools.engine.checkpoint import (
    checkpoint_paths,
    epoch_checkpoint_path,
    load_latest_checkpoint,
    load_training_checkpoint,
    rng_state,
    set_rng_state,
)
from tools.engine.meters import EpochProgress

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a training checkpoint saves and restores, and the run's plain settings."""

    exp_dir: str
    student: Student
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    identity: dict
    settings: dict  # the run's arguments, saved as ``args``
    epochs: int
    save_freq: int
    is_main: bool = True


def run_identity(fingerprint: dict, teacher: str, student: dict) -> dict:
    """What defines a run: the data fingerprint, the teacher's fingerprint and the student's settings."""
    return {"data": fingerprint, "teacher": teacher, **student}


def teacher_fingerprint(teacher, weights: str | None, use_fc: bool) -> str:
    """Architecture, format, head choice, a ViT's pooling and the weights' SHA-256 (a cache records the
    teacher it came from)."""
    manifest = getattr(teacher, "manifest", None)
    if manifest is not None:
        t, views = manifest["teacher"], manifest.get("views", {})
        pool = f"/pool={t['pool']}" if t.get("pool") else ""
        # A K-view cache's targets follow its views: resuming on another K would change them.
        per_view = f"/{views['n_views']} views" if views.get("mode", "centre crop") != "centre crop" else ""
        # dense targets stored on a coarser grid (--cache_grid) are other targets than the live teacher's
        grid = "/dense {}x{}".format(*teacher.dense_grid) if getattr(teacher, "objective", "global") != "global" else ""
        return f"{t['arch']}/{t['format']}/fc={t['use_fc']}{pool}/{t['weights_sha256']}{per_view}{grid}"
    pool = f"/pool={teacher.pool}" if getattr(teacher, "pool", None) else ""  # CNN fingerprints unchanged
    return f"{teacher.arch}/{teacher.fmt}/fc={use_fc}{pool}/{file_sha256(weights)}"


def _as_recorded(identity: dict, version: int) -> dict:
    """``identity`` in the form a checkpoint of ``version`` recorded it (version 1: no paths)."""
    if version >= 2:
        return identity
    data = identity["data"]
    legacy = {k: v for k, v in identity.items() if k != "data"}
    classes = hashlib.sha1("\n".join(data["classes"]).encode()).hexdigest()
    return {"n_images": data["n_images"], "classes": classes, **legacy}


def check_same_run(path: str, ckpt: dict, identity: dict) -> None:
    """Refuse to resume ``ckpt`` when it belongs to another run, naming what differs."""
    diff = differences(ckpt.get("identity", {}), _as_recorded(identity, ckpt["version"]))
    if diff:
        raise UserError(
            f"'{path}' belongs to a different run ({'; '.join(diff[:4])}); use another --exp_dir, or --no_resume "
            "to overwrite it"
        )


def init_student_weights(student: Student, path: str) -> None:
    """``--weights``: load a student backbone (and its heads, where their layout matches) from any student file."""
    fmt, conv = read_student_weights(path, student.encoder.backbone, student.arch)
    load_strict(student.encoder.backbone, conv.backbone, path, "student backbone")
    stored = conv.heads or ([conv.head] if conv.head is not None else [])
    loaded = 0
    pairs = [*zip(student.heads, stored, strict=False),
             *zip(getattr(student, "dense_heads", []), conv.dense_heads or [], strict=False)]  # fmt: skip
    for head, sd in pairs:
        if {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in head.state_dict().items()}:
            head.load_state_dict(sd)
            loaded += 1
    if loaded:
        n_heads = len(student.heads) + len(getattr(student, "dense_heads", []))
        what = "head" if n_heads == 1 else f"{loaded} of {n_heads} heads"
        log.info("student backbone and %s initialised from %s (%s)", what, path, fmt)
    else:
        log.info("student backbone initialised from %s (%s); head starts fresh", path, fmt)


def resume(run: Run, resume_from: str = "", no_resume: bool = False, weights: str | None = None):
    """Continue from ``resume_from`` or the experiment's latest checkpoint; else start (from ``weights``).

    Rank 0 decides and reads the checkpoint; every rank receives it from rank 0, so ranks whose
    ``exp_dir`` is not shared (another machine's local disk: only rank 0 writes checkpoints) resume at
    the same epoch with the same state. Returns the first epoch to run and how much of it is already
    done (mid-epoch checkpoints).
    """
    if resume_from and weights:
        raise UserError("--weights and --resume were both given; --resume continues a run, --weights starts a new one")
    found = distributed.from_rank0(lambda: find_checkpoint(run.exp_dir, resume_from, no_resume))
    if found is None:
        if weights:
            init_student_weights(run.student, weights)
        return 1, EpochProgress()
    path, ckpt = found
    check_same_run(path, ckpt, run.identity)
    if run.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {run.epochs} is below the {ckpt['epoch']} epochs already done in '{path}'")
    load_strict(run.student.encoder.backbone, ckpt["student"], path, "student backbone")
    load_heads(run.student, ckpt, path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    progress = EpochProgress(**ckpt["progress"]) if ckpt.get("progress") else EpochProgress()
    log.info("resumed from %s: %d epochs done, %d steps into the next", path, ckpt["epoch"], progress.step)
    return ckpt["epoch"] + 1, progress


def load_heads(student: Student, ckpt: dict, path: str) -> None:
    """The prediction heads of a training checkpoint into ``student``, strictly: the global heads (none for
    ``--loss dense``, stored as an empty ``head``) and the dense heads."""
    head_states = ckpt.get("heads") or ([ckpt["head"]] if ckpt["head"] else [])
    dense_states = ckpt.get("dense_heads") or []
    dense_heads = getattr(student, "dense_heads", [])
    if len(head_states) != len(student.heads) or len(dense_states) != len(dense_heads):
        raise UserError(
            f"'{path}' holds {len(head_states)} prediction head(s) and {len(dense_states)} dense head(s), this run "
            f"has {len(student.heads)} and {len(dense_heads)}"
        )
    for k, (head, sd) in enumerate(zip(student.heads, head_states, strict=True), start=1):
        load_strict(head, sd, path, f"student head {k}" if len(head_states) > 1 else "student head")
    for k, (head, sd) in enumerate(zip(dense_heads, dense_states, strict=True), start=1):
        load_strict(head, sd, path, f"student dense head {k}")


def find_checkpoint(exp_dir: str, resume_from: str = "", no_resume: bool = False) -> tuple[str, dict] | None:
    """(path, checkpoint) to resume from: ``resume_from``, else the experiment's latest; None to start fresh."""
    if resume_from:
        return resume_from, load_training_checkpoint(resume_from)
    return None if no_resume else load_latest_checkpoint(exp_dir)


def save_checkpoint(run: Run, epoch: int, progress: EpochProgress | None = None) -> None:
    """Rank 0 writes the latest checkpoint (the one it replaces is kept as the fallback).

    With ``progress`` the checkpoint is mid-epoch: ``epoch`` - 1 epochs are done plus ``progress.step``
    steps of ``epoch``. At epoch ends, every ``save_freq`` epochs, it is also kept as ckpt_epoch_<N>.pth.
    """
    if not run.is_main:
        return
    heads = {"heads": [h.state_dict() for h in run.student.heads]} if len(run.student.heads) > 1 else {}
    if hasattr(run.student, "dense_heads"):  # --loss dense / both
        heads["dense_heads"] = [h.state_dict() for h in run.student.dense_heads]
    state = training_state(
        epoch=epoch - 1 if progress else epoch,
        progress=asdict(progress) if progress else None,
        identity=run.identity,
        args=run.settings,
        student=run.student.backbone_state_dict(),
        head=run.student.head.state_dict() if run.student.heads else {},  # --loss dense: no global head
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),
        rng=rng_state(),
        **heads,
    )
    paths = checkpoint_paths(run.exp_dir)
    atomic_save(state, paths["latest"], keep_previous=paths["previous"])
    if not progress and (epoch % run.save_freq == 0 or epoch == run.epochs):
        atomic_save(state, epoch_checkpoint_path(run.exp_dir, epoch))


def export_backbone(run: Run) -> str:
    """Rank 0 writes the final backbone as a bare state dict (loads into torchvision, no fc); returns its path."""
    path = os.path.join(run.exp_dir, "checkpoints", "student_backbone.pth")
    if run.is_main:
        atomic_save(run.student.backbone_state_dict(), path)
    return path
