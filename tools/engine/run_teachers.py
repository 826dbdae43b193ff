"""The teachers of a run: per-teacher flag values -> specs -> frozen teachers, live or cached.

One teacher is the paper's setting and runs exactly as before. Several teachers (the paper's
multi-teacher SimReg) are a :class:`models.teachers.TeacherSet`: one head per teacher on the student,
the loss the weighted mean of the per-teacher losses. Every per-teacher flag takes one value for all
teachers or one per teacher; with ``--use_cache`` each teacher has an entry in ``--teacher_feats``,
``-`` for a teacher that runs live from its ``--teacher_weights`` file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models.errors import UserError
from models.fold import compile_frozen
from models.teachers import TeacherSet, load_teacher
from tools.engine.cli import TEACHER_POOLS, as_list, check_paths
from tools.teacher_cache.reader import autocast_name, open_cached_teacher

log = logging.getLogger(__name__)

NONE = "-"  # a placeholder in a per-teacher list: no file for this teacher
YES, NO = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher as the flags describe it: a checkpoint (live), a cache (``feats``), or both (checked)."""

    weights: str | None
    arch: str | None
    fmt: str
    use_fc: bool
    feats: str | None = None
    pool: str = "auto"  # a ViT teacher's feature: auto (the publisher's), cls, avg, cls+avg


def _per_teacher(flag: str, values: list, n: int) -> list:
    """``values`` stretched to ``n`` teachers: one value for all, or exactly one per teacher."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(
            f"{flag} has {len(values)} values for {n} teachers; give one value for all teachers or one per teacher"
        )
    return values


def _flag_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in YES + NO:
        return str(value).lower() in YES
    raise UserError(f"--teacher_fc takes yes or no per teacher (or nothing: every teacher), got {value!r}")


def teacher_specs(weights, arch, fmt, use_fc, feats, use_cache: bool, pool="auto") -> list[TeacherSpec]:
    """The run's teachers from the (one or many) values of the teacher flags, in the order given."""
    weights, feats = as_list(weights), as_list(feats)
    if bool(use_cache) != bool(feats):
        raise UserError(
            "--use_cache and --teacher_feats FILE.npy go together (the cache comes from "
            "python -m tools.cache_teacher_features); pass both, or neither for a live teacher"
        )
    n = max(len(weights), len(feats))
    if n == 0:
        raise UserError("no teacher given; pass --teacher_weights FILE (a MoCo, torchvision, ... checkpoint)")
    weights = _per_teacher("--teacher_weights", weights, n) if weights else [NONE] * n
    feats = _per_teacher("--teacher_feats", feats, n) if feats else [NONE] * n
    fcs = [_flag_bool(v) for v in _per_teacher("--teacher_fc", as_list(use_fc), n)]
    archs = _per_teacher("--arch_teacher", as_list(arch) or [None], n)
    fmts = _per_teacher("--teacher_format", as_list(fmt), n)
    pools = _per_teacher("--teacher_pool", as_list(pool), n)
    bad = [p for p in pools if p not in TEACHER_POOLS]
    if bad:
        raise UserError(f"--teacher_pool {bad[0]!r} is not one of {', '.join(TEACHER_POOLS)}")
    specs = []
    for k in range(n):
        w, f = (None if weights[k] == NONE else weights[k]), (None if feats[k] == NONE else feats[k])
        if w is None and f is None:
            raise UserError(f"teacher {k + 1} has neither a --teacher_weights file nor a --teacher_feats cache")
        check_paths(weights={"--teacher_weights": w}, files={"--teacher_feats": f})
        specs.append(TeacherSpec(w, archs[k], fmts[k], fcs[k], f, pools[k]))
    return specs


def objective_settings(
    loss: str, dense_weight: float | None, dense_blocks: int | None, specs: list[TeacherSpec]
) -> tuple[float | None, int | None]:
    """``--loss`` and the flags that belong to it, checked; (``--dense_weight``, ``--dense_blocks``) with a dense
    objective's defaults (1 and 1), unchanged (None) for the global loss."""
    if dense_weight is not None and loss != "both":
        raise UserError(f"--dense_weight weighs the dense term of --loss both; drop it with --loss {loss}")
    if dense_blocks is not None and loss == "global":
        raise UserError("--dense_blocks chooses the dense targets; add --loss dense or --loss both, or drop it")
    if loss == "dense" and any(spec.use_fc for spec in specs):
        raise UserError("--teacher_fc chooses the pooled target; --loss dense regresses the feature map only: "
                        "drop --teacher_fc, or use --loss both")  # fmt: skip
    if loss == "dense" and any(spec.pool != "auto" for spec in specs):
        raise UserError("--teacher_pool chooses the pooled target; --loss dense regresses the patch tokens only: "
                        "drop --teacher_pool, or use --loss both")  # fmt: skip
    if loss == "global":
        return dense_weight, dense_blocks
    return (1.0 if dense_weight is None else dense_weight), (1 if dense_blocks is None else dense_blocks)


def loss_weights(values, n: int) -> list[float] | None:
    """``--teacher_loss_weights``: n non-negative numbers with a positive sum (None: equal weights)."""
    values = as_list(values)
    if not values:
        return None
    values = _per_teacher("--teacher_loss_weights", values, n) if len(values) != 1 or n == 1 else values * n
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise UserError(f"--teacher_loss_weights takes numbers, got {values}") from None
    if min(out) < 0 or sum(out) <= 0 or any(v != v for v in out):
        raise UserError(f"--teacher_loss_weights {values}: give non-negative numbers with a positive sum")
    return out


def build_one(spec: TeacherSpec, device: torch.device, fingerprint: dict, options: dict):
    """The live frozen teacher, or the cached one (same ``targets(images, indices)`` call)."""
    if spec.feats:
        teacher = {"arch": spec.arch, "weights": spec.weights, "use_fc": spec.use_fc, "pool": spec.pool}
        views, epochs = options.get("views"), options.get("epochs")
        cached = open_cached_teacher(spec.feats, fingerprint, device, options["cache_on_device"],
                                     options["image_size"], teacher=teacher, views=views, epochs=epochs,
                                     autocast=autocast_name(options.get("amp")))  # fmt: skip
        return cached.use_objective(options.get("objective", "global"), options.get("dense_blocks", 1))
    teacher = load_teacher(spec.weights, spec.arch, spec.fmt, use_fc=spec.use_fc, pool=spec.pool,
                           input_size=options["image_size"])  # fmt: skip
    teacher = teacher.to(device, options.get("dtype", torch.float32))
    if options["channels_last"]:
        teacher = teacher.to(memory_format=torch.channels_last)
    objective = options.get("objective", "global")
    teacher.use_objective(objective, options.get("dense_blocks", 1), options["image_size"])
    if options["compile_teacher"]:  # inference only: BatchNorm folds into the convs (a ViT is compiled as is)
        # the dense objectives read the map where the network pools, so the graph keeps its modules unfolded
        teacher.encoder = compile_frozen(teacher.encoder, fold=objective == "global")
    return teacher


def build_teachers(specs: list[TeacherSpec], device: torch.device, fingerprint: dict, weights=None, **options):
    """One teacher as itself; several as a :class:`TeacherSet` with the (normalised) loss weights.

    ``options``: ``channels_last``, ``compile_teacher``, ``cache_on_device``, ``image_size``, ``dtype`` (a live
    teacher's parameters: float32, or float64 for ``--float64``), ``amp`` (the run's autocast dtype, compared
    with a cache's), ``objective`` and ``dense_blocks`` (``--loss``: what the targets are), and for K-view
    caches ``views`` (the run's ``TrainViews.record(seed)``, checked against each cache) and ``epochs``.
    """
    teachers = [build_one(spec, device, fingerprint, options) for spec in specs]
    if len(teachers) == 1:
        return teachers[0]
    group = TeacherSet(teachers, weights)
    parts = zip(teachers, group.feat_dims, group.weights, strict=True)
    shown = ", ".join(f"{t.arch} ({d}-d, weight {w:.3g})" for t, d, w in parts)
    log.info("%d teachers, one head each: %s", len(teachers), shown)
    return group


def members(teacher) -> list:
    """The teachers behind ``teacher`` (itself, or a TeacherSet's)."""
    return list(teacher.teachers) if isinstance(teacher, TeacherSet) else [teacher]


def view_period(teacher) -> int:
    """K of the run's K-view caches (0: none), after which the loader's crops repeat; one K for all of them."""
    periods = {getattr(t, "view_period", 0) for t in members(teacher)} - {0}
    if len(periods) > 1:
        raise UserError(
            f"the teacher caches hold different numbers of views ({', '.join(map(str, sorted(periods)))}); the "
            "loader can repeat only one period of crops: build every K-view cache with the same --views K"
        )
    return periods.pop() if periods else 0
