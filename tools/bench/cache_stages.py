"""The benchmark's teacher-cache stages: what a K-view cache costs to build, and what it saves per step.

``cache_build`` builds a K-view cache of the generated JPEGs with ``build_cache`` (the code
``python -m tools.cache_teacher_features --views K`` runs) and times it; a stand-in 8192-d teacher (a
linear map of the mean pixel: the file's layout, not the speed) gives the bytes per row of a wide
teacher. From the bytes per row: the size of one view of ImageNet-1k (1,281,167 images).
``cache_step`` times ``distill_step`` (what ``train_student.py`` runs) with the live teacher (the
baseline), with the cache memory-mapped and with it on the device, on the same batches of the training
loader (epoch 1, the cache's view 1). Its rows also give images per CPU-second of this process, the
steadier figure on a shared CPU.
"""

from __future__ import annotations

import os

import torch

from data.datasets import IndexedImageFolder, dataset_fingerprint
from data.loaders import build_loader
from data.transforms import TeacherView, TrainViews
from models.teachers import load_teacher
from tools.bench.harness import Context, measure, random_teacher_file, steps_variant, timed, with_repeat
from tools.bench.train_stages import OursStep
from tools.engine.distributed import DistInfo
from tools.engine.step import amp_dtype
from tools.teacher_cache.builder import build_cache
from tools.teacher_cache.reader import CachedTeacher

IMAGENET_TRAIN = 1_281_167
WIDE_DIM = 8192  # SimCLR ResNet-50x4's feature size


class PooledLinear(torch.nn.Module):
    """images (B, 3, H, W) -> (B, D): a linear map of the mean pixel (cheap: only the width matters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear, self.feat_dim = torch.nn.Linear(3, dim), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3)))


def cache_inputs(p, ctx: Context) -> tuple:
    """(the live teacher, the training views, the teacher's view of the JPEGs), built once per run."""
    if "cache_inputs" not in ctx.shared:
        teacher = load_teacher(random_teacher_file(ctx.work_dir, p.teacher), p.teacher).to(ctx.device)
        views = TrainViews(p.step_size, True, True, False)  # the paper's single weak view
        dataset = IndexedImageFolder(ctx.train_dir, TeacherView(views), seed=0)
        ctx.shared["cache_inputs"] = teacher, views, dataset
    return ctx.shared["cache_inputs"]


def build_view_cache(p, ctx: Context, teacher, out: str, n_views: int, overwrite: bool) -> None:
    """``build_cache`` of ``n_views`` views of the JPEGs with ``teacher`` into ``out``, as the cache command runs it."""
    _, views, dataset = cache_inputs(p, ctx)
    described = {"arch": getattr(teacher, "arch", "stand-in"), "format": getattr(teacher, "fmt", "none")}
    manifest = {"teacher": {**described, "use_fc": False, "weights_sha256": ""}, "preprocessing": {}}
    manifest["views"] = views.record(0)
    build_cache(teacher, dataset, out, manifest, batch_size=p.step_batch, num_workers=p.workers,
                dist_info=DistInfo(device=ctx.device), overwrite=overwrite, n_views=n_views)  # fmt: skip


def view_cache_path(p, ctx: Context) -> str:
    return os.path.join(ctx.work_dir, f"cache_{p.views}views_{p.step_size}px_{p.images}images.npy")


def stage_cache_build(p, ctx: Context) -> list[dict]:
    """Seconds to build a ``views``-view cache (one teacher forward per row), and the bytes a row takes."""
    teacher, _, dataset = cache_inputs(p, ctx)
    out = view_cache_path(p, ctx)
    _, seconds, _ = timed(lambda: build_view_cache(p, ctx, teacher, out, p.views, overwrite=True), ctx.device)
    wide = os.path.join(ctx.work_dir, f"cache_{WIDE_DIM}d_{p.images}images.npy")
    build_view_cache(p, ctx, PooledLinear(WIDE_DIM).to(ctx.device), wide, 2, overwrite=True)
    rows = p.views * len(dataset)
    per_row = {teacher.feat_dim: os.path.getsize(out) / rows, WIDE_DIM: os.path.getsize(wide) / (2 * len(dataset))}
    row = {"stage": "cache_build", "config": f"build {p.views} views: {p.teacher} at {p.step_size} px, "
           f"batch {p.step_batch}, {p.workers} workers", "role": "other", "unit": "rows", "note": "",
           "key": "cache_build.build", "img_s": rows / seconds, "ratio_vs_baseline": None, "spread": None}  # fmt: skip
    row.update(build_seconds=round(seconds, 2), seconds_per_view=round(seconds / p.views, 2),
               rows_per_s=round(rows / seconds, 1), bytes_per_row={d: round(b, 2) for d, b in per_row.items()},
               imagenet_gib_per_view={d: round(b * IMAGENET_TRAIN / 2**30, 2) for d, b in per_row.items()})  # fmt: skip
    return [row]


def stage_cache_step(p, ctx: Context) -> list[dict]:
    """Images/s of the live step against the cached one (memory-mapped and on the device), same batches."""
    teacher, views, _ = cache_inputs(p, ctx)
    path = view_cache_path(p, ctx)
    build_view_cache(p, ctx, teacher, path, p.views, overwrite=False)  # nothing to do after cache_build
    dataset = IndexedImageFolder(ctx.train_dir, views, seed=0)
    loader = build_loader(dataset, p.step_batch, num_workers=p.workers, seed=0)
    loader.sampler.set_epoch(1)
    batches = []
    for images, _, index in loader:  # the loader's own crops of epoch 1 = the cache's view 1
        batches.append((images, index))
        if len(batches) == p.step_iters:
            break
    fingerprint, dev = dataset_fingerprint(dataset), ctx.device
    live = OursStep(teacher, p.student, dev, amp_dtype(p.amp, dev), channels_last=False)
    cached = [("cached, memory-mapped", "mmap", CachedTeacher(path, fingerprint, dev)),
              ("cached, on the device", "device", CachedTeacher(path, fingerprint, dev, on_device=True))]  # fmt: skip
    variants = [steps_variant("live teacher", live, batches, len(batches), "baseline", "live")]
    variants += [steps_variant(name, live.with_teacher(t), batches, len(batches), key=key) for name, key, t in cached]
    return measure("cache_step", with_repeat(variants), p.rounds, dev, "images", cpu_time=True)
