"""The benchmark's training stages: data pipeline, the step, end to end, the step with a cached teacher.

Every "ours" row runs what ``train_student.py`` runs: ``build_loader`` over an ``IndexedImageFolder``
with ``TrainViews`` (the decoders of :mod:`data.decode`, or ``--decode gpu``'s batched decoding of
:mod:`data.device_decode`), ``distill_step`` with ``build_optimizer`` (:mod:`tools.engine.step`), and
the cached teacher opened by ``open_cached_teacher`` (:mod:`tools.teacher_cache.reader`) from a cache file in
the builder's format. The baselines are the original recipe (:mod:`tools.bench.baseline`).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from data.datasets import IndexedImageFolder
from data.device_decode import DEVICE_DECODE
from data.loaders import build_loader
from data.prefetch import DevicePrefetcher
from data.transforms import TrainViews
from models.backbones import build_encoder
from models.fold import compile_frozen
from models.io import atomic_write, read_json, write_json
from models.simreg import Student
from models.teachers import Teacher
from tools.bench.baseline import OriginalFolder, OriginalStep, build_original_pair, normalised_pair, original_loader
from tools.bench.dali import dali_available, dali_iterator
from tools.bench.harness import (
    Context,
    Cycle,
    Variant,
    identity,
    loader_variant,
    measure,
    steps_variant,
    timed,
    with_repeat,
)
from tools.engine.distributed import DistInfo
from tools.engine.step import StepConfig, build_optimizer, distill_step
from tools.teacher_cache.reader import CENTRE_CROP, MANIFEST_VERSION, manifest_path, open_cached_teacher

SIMCLR_X4_DIM = 8192  # SimCLR ResNet-50x4's pooled feature: the paper's cached SimCLR-x4 -> ResNet-50 run


def flag_name(decoder: str) -> str:
    """The ``--decode`` value that selects a transform-level decoder (``auto`` is the flag's ``cpu``)."""
    return "cpu" if decoder == "auto" else decoder


# ============ stage: data pipeline only ============
def stage_data(p, ctx: Context) -> list[dict]:
    """Images/s of the loader workers: the original float pipeline against our uint8 decoders."""
    folder = IndexedImageFolder(ctx.train_dir)
    base = original_loader(OriginalFolder(folder, p.crop), p.data_batch, p.workers, pin_memory=False)
    variants = [loader_variant("original: PIL float32 crops, view x2", base, None, identity, "baseline", "original")]
    for name in p.decoders:
        ds = IndexedImageFolder(ctx.train_dir, TrainViews(p.crop, True, True, False, decode=name))
        loader = build_loader(ds, p.data_batch, num_workers=p.workers)
        variants.append(loader_variant(f"ours: uint8 crops, --decode {flag_name(name)}", loader, None, identity,
                                       key=flag_name(name)))  # fmt: skip
    variants += device_decode_variants(p, ctx)
    rows = measure("data", with_repeat(variants), p.rounds, ctx.device, "images")
    for row in rows:
        row["workers"] = p.workers
        if row["img_s"] and row["key"] not in ("data.gpu", "data.dali"):  # those decode outside the workers
            row["img_s_per_core"] = row["img_s"] / p.workers
    return rows


def device_decode_variants(p, ctx: Context) -> list[Variant]:
    """``--decode gpu`` (workers read bytes and draw boxes; decoded on the device in the loop here: the decoding
    alone), and DALI."""
    if not p.device_decode:
        return []
    ds = IndexedImageFolder(ctx.train_dir, TrainViews(p.crop, True, True, False, decode=DEVICE_DECODE))
    loader = build_loader(ds, p.data_batch, num_workers=p.workers)
    name = f"ours: --decode gpu (batched decode_jpeg on {ctx.device.type})"
    out = [loader_variant(name, loader, None, lambda b: (b[0].decode(ctx.device),), key="gpu")]
    dali = "DALI (mixed decode, its own crops)"
    if not (dali_available() and ctx.device.type == "cuda"):
        return [*out, Variant(dali, None, note="skipped: nvidia.dali not installed", key="dali")]
    files = [os.path.join(ds.root, rel) for rel, _ in ds.samples]
    it = dali_iterator(files, p.data_batch, p.crop, p.workers, ctx.device.index or 0)

    def run_dali() -> int:
        return sum(batch[0]["images"].shape[0] for batch in it)

    return [*out, Variant(dali, run_dali, note="its own random crops (same distribution), not our boxes", key="dali")]


# ============ stage: the step on synthetic on-device batches ============
def live_teacher(arch: str, device: torch.device, compile_backend: str | None) -> Teacher:
    """A randomly initialised frozen teacher, channels_last, folded and compiled as --compile_teacher does."""
    teacher = Teacher(build_encoder(arch), arch, "random").to(device).to(memory_format=torch.channels_last)
    if compile_backend:
        teacher.encoder = compile_frozen(teacher.encoder, backend=compile_backend)
    return teacher


class OursStep:
    """Our training step exactly as train_student.py runs it (``distill_step``), on random weights."""

    def __init__(
        self,
        teacher,
        student_arch: str,
        device: torch.device,
        amp,
        compile_backend: str | None = None,
        channels_last: bool = True,
    ) -> None:
        student = Student(student_arch, teacher.feat_dim).to(device)
        if channels_last:
            student = student.to(memory_format=torch.channels_last)
        self.model = torch.compile(student, backend=compile_backend) if compile_backend else student  # --compile
        self.teacher = teacher
        self.optimizer = build_optimizer(student.parameters(), 0.05, 0.9, 1e-4, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.cfg = StepConfig(DistInfo(device=device), amp, channels_last=channels_last, print_freq=1 << 30)

    def __call__(self, views, index: torch.Tensor) -> torch.Tensor:
        return distill_step(self.model, self.teacher, views, index, self.optimizer, self.scaler, self.cfg)

    def with_teacher(self, teacher) -> OursStep:
        """The same student and optimizer with another teacher (e.g. a cached one)."""
        clone = copy.copy(self)
        clone.teacher = teacher
        return clone


def ours_steps(p, ctx: Context) -> dict[str, OursStep]:
    """Our step in its configurations (built once, shared by the later stages), keyed by row name."""
    if not ctx.ours:
        teacher = live_teacher(p.teacher, ctx.device, None)
        ctx.ours["ours: fp32, channels_last, no sync"] = OursStep(teacher, p.student, ctx.device, None)
        ctx.ours["ours: bf16, channels_last, no sync"] = OursStep(teacher, p.student, ctx.device, torch.bfloat16)
        if p.compile:
            name = f"ours: bf16, channels_last, compiled ({ctx.compile_backend})"
            compiled = live_teacher(p.teacher, ctx.device, ctx.compile_backend)
            ctx.ours[name] = OursStep(compiled, p.student, ctx.device, torch.bfloat16, ctx.compile_backend)
    return ctx.ours


STEP_KEYS = {"fp32": "fp32", "bf16, channels_last, no": "bf16", "compiled": "compiled"}


def step_key(name: str) -> str:
    return next(key for part, key in STEP_KEYS.items() if part in name)


def best_step(p, ctx: Context) -> str:
    """Our fastest step configuration as measured by the step stage (else bf16 on CUDA, fp32 on CPU)."""
    ours = ours_steps(p, ctx)
    measured = [r for r in ctx.rows if r["stage"] == "step" and r["config"] in ours and r["img_s"]]
    if measured:
        return max(measured, key=lambda r: r["img_s"])["config"]
    return [k for k in ours if ("bf16" in k) == (ctx.device.type == "cuda")][-1]


def original_step(p, ctx: Context) -> OriginalStep:
    if ctx.original is None:
        teacher, student = build_original_pair(p.teacher, p.student, ctx.device)
        ctx.original = OriginalStep(teacher, student, ctx.device)
    return ctx.original


def synthetic_batches(p, device: torch.device) -> list[torch.Tensor]:
    """Three distinct random uint8 batches (B, 3, S, S) on the device (never zeros)."""
    shape = (p.step_batch, 3, p.step_size, p.step_size)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for _ in range(3)]


def stage_step(p, ctx: Context) -> list[dict]:
    """Images/s of one distillation step on batches already on the device (no loader)."""
    u8 = synthetic_batches(p, ctx.device)
    pairs = [normalised_pair(x) for x in u8]
    name = "original: fp32 NCHW, MoCo shuffle, sync per step"
    variants = [steps_variant(name, original_step(p, ctx), pairs, p.step_iters, "baseline", "original")]
    index = torch.arange(p.step_batch)
    for name, step in ours_steps(p, ctx).items():
        variants.append(steps_variant(name, step, [(x, index) for x in u8], p.step_iters, key=step_key(name)))
    if not p.compile:
        variants.append(Variant("ours: compiled", None, note="skipped: compilation is off in this profile",
                                key="compiled"))  # fmt: skip
    return measure("step", with_repeat(variants), p.rounds, ctx.device, "images")


# ============ stage: the step with a cached teacher ============
def synthetic_cache(work_dir: str, rows: int, dim: int, crop: int) -> str:
    """A teacher cache file (rows, dim) float16 of random features with its manifest; kept for the next run.

    Written as the cache builder writes one (the array, then the manifest), for the reader to open as
    it opens a real cache (no dataset to check it against: ``fingerprint=None``).
    """
    path = os.path.join(work_dir, f"cache_{rows}x{dim}.npy")
    manifest = {"version": MANIFEST_VERSION, "n_images": rows, "classes": [], "paths_sha256": "synthetic",
                "shape": [rows, dim], "teacher": {"arch": "synthetic", "format": "random", "use_fc": False},
                "preprocessing": {"crop_size": crop}, "views": CENTRE_CROP}  # fmt: skip
    if read_json(manifest_path(path)) == manifest and os.path.isfile(path):
        return path
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (rows, dim)}  # fmt: skip
    block = np.random.default_rng(0).standard_normal((min(rows, 1 << 16), dim), dtype=np.float32).astype(np.float16)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, rows, len(block)):  # the block repeats: contents do not matter for speed
            f.write(block[: min(len(block), rows - start)].tobytes())

    atomic_write(path, write)
    write_json(manifest_path(path), manifest)
    return path


def gather_seconds(teacher, p, device: torch.device, reps: int = 50) -> float:
    """Mean time of one batch's ``targets`` (B random rows) with host indices, as the loader hands them."""
    rows = teacher.feats.shape[0]
    idx = [torch.randint(0, rows, (p.step_batch,)) for _ in range(reps)]
    images = torch.empty(0, device=device)
    teacher.targets(images, idx[0])
    _, seconds, _ = timed(lambda: [teacher.targets(images, i) for i in idx], device)
    return seconds / reps


def cached_variants(p, ctx: Context, best: str) -> tuple[list[Variant], dict]:
    """The live baseline, our live step, our step with the cache memory-mapped / on the device, SimCLR-x4 -> R50."""
    dim = build_encoder(p.teacher).feat_dim
    path = synthetic_cache(ctx.work_dir, p.cache_rows, dim, p.step_size)
    teachers = {
        "mmap": open_cached_teacher(path, None, ctx.device, on_device=False),  # train_student's default
        "device": open_cached_teacher(path, None, ctx.device, on_device=True),  # --cache_on_device
    }
    u8 = synthetic_batches(p, ctx.device)
    batches = [(x, torch.randint(0, p.cache_rows, (p.step_batch,))) for x in u8]  # host indices, as from a loader
    pairs = [normalised_pair(x) for x in u8]
    live = ours_steps(p, ctx)[best]
    tag = best.removeprefix("ours: ")
    variants = [
        steps_variant("original: live teacher, fp32", original_step(p, ctx), pairs, p.step_iters, "baseline",
                      "original"),
        steps_variant(f"ours: live teacher, {tag}", live, batches, p.step_iters, key="live"),
        steps_variant(f"ours: cached teacher, memory-mapped, {tag}", live.with_teacher(teachers["mmap"]), batches,
                      p.step_iters, key="mmap"),
        steps_variant(f"ours: cached teacher, on the device, {tag}", live.with_teacher(teachers["device"]), batches,
                      p.step_iters, key="device"),
    ]  # fmt: skip
    x4 = open_cached_teacher(synthetic_cache(ctx.work_dir, p.x4_rows, SIMCLR_X4_DIM, p.step_size), None, ctx.device)
    teachers["x4_r50"] = x4
    x4_batches = [(x, torch.randint(0, p.x4_rows, (p.step_batch,))) for x in u8]
    x4_step = OursStep(x4, "resnet50", ctx.device, live.cfg.amp_dtype)
    name = f"ours: SimCLR-x4 cache ({SIMCLR_X4_DIM}-d, memory-mapped) -> ResNet-50 student, not compiled"
    variants.append(steps_variant(name, x4_step, x4_batches, p.step_iters, "other", "x4_r50"))
    return variants, teachers


def stage_cached(p, ctx: Context) -> list[dict]:
    """Images/s of the step when the targets come from a cached teacher (tools.teacher_cache.reader)."""
    variants, teachers = cached_variants(p, ctx, best_step(p, ctx))
    rows = measure("cached", with_repeat(variants), p.rounds, ctx.device, "images")
    for row in rows:
        teacher = teachers.get(row["key"].split(".", 1)[1])
        if teacher is not None and row["img_s"]:
            gather = gather_seconds(teacher, p, ctx.device)
            row.update(gather_ms=gather * 1e3, gather_fraction_of_step=gather / (p.step_batch / row["img_s"]))
            row["cache_gb"] = teacher.feats.nbytes / 1e9
    return rows


# ============ stage: end to end (loader + step) ============
def e2e_variants(p, ctx: Context, best: str) -> list[Variant]:
    """Original loader + step; ours with CPU decoding and with --decode gpu, each batch made ready by the
    prefetch thread as training does (:class:`data.prefetch.DevicePrefetcher`); each of our loaders alone."""
    pin, length = ctx.device.type == "cuda", p.e2e_batches * p.step_batch
    base = original_loader(Cycle(OriginalFolder(IndexedImageFolder(ctx.train_dir), p.step_size), length),
                           p.step_batch, p.workers, pin)  # fmt: skip
    step = ours_steps(p, ctx)[best]
    tag = best.removeprefix("ours: ").replace(", no sync", "").replace("channels_last, ", "")

    def loader(decode: str):
        ds = IndexedImageFolder(ctx.train_dir, TrainViews(p.step_size, True, True, False, decode=decode))
        collate = ds.transform.collate  # Cycle hides the transform from build_loader
        batches = build_loader(Cycle(ds, length), p.step_batch, num_workers=p.workers, pin_memory=pin,
                               collate_fn=collate)  # fmt: skip
        return DevicePrefetcher(batches, ctx.device)

    cpu = loader("auto")
    variants = [
        loader_variant("original: float32 x2 loader + original step", base, original_step(p, ctx), lambda b: b[0],
                       "baseline", "original"),
        loader_variant(f"ours: --decode cpu loader + step ({tag})", cpu, step, lambda b: (b[0], b[2]), key="cpu"),
        loader_variant("ours: --decode cpu loader alone", cpu, None, identity, "component", "cpu_loader"),
    ]  # fmt: skip
    if p.device_decode:
        gpu, dev = loader(DEVICE_DECODE), ctx.device.type
        variants += [
            loader_variant(f"ours: --decode gpu on {dev} + step ({tag})", gpu, step, lambda b: (b[0], b[2]),
                           key="gpu"),
            loader_variant(f"ours: --decode gpu on {dev}, loader and decoding alone", gpu, None, identity,
                           "component", "gpu_loader"),
        ]  # fmt: skip
    return variants


def stage_e2e(p, ctx: Context) -> list[dict]:
    """Images/s of loader + step together, and which side bounds it (the loader alone vs the step alone)."""
    best = best_step(p, ctx)
    rows = measure("e2e", with_repeat(e2e_variants(p, ctx, best)), p.rounds, ctx.device, "images")
    step_rate = next((r["img_s"] for r in ctx.rows if r["stage"] == "step" and r["config"] == best), None)
    for row, alone in zip(rows, rows[1:], strict=False):
        if row["role"] == "variant" and alone["role"] == "component":
            row.update(loader_img_s=alone["img_s"], step_img_s=step_rate)
            if step_rate:
                row["bound"] = "data" if alone["img_s"] < step_rate else "step"
    return rows


# ============ stage: students alone (the demo's choice of student) ============
class FixedTargets:
    """A stand-in teacher that gives the same targets (B, D) for every batch: the step times the student alone."""

    weights = None

    def __init__(self, target: torch.Tensor) -> None:
        self.target, self.feat_dim = target, target.shape[1]

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.target


def stage_students(p, ctx: Context) -> list[dict]:
    """Images/s of each student's training step (forward, backward, SGD; ``distill_step`` with fixed targets).

    The first student is the baseline, so the ratios compare the students with each other.
    """
    u8 = synthetic_batches(p, ctx.device)
    index = torch.arange(p.step_batch)
    teacher = FixedTargets(torch.randn(p.step_batch, p.teacher_dim, generator=torch.Generator().manual_seed(0)))
    variants = []
    for i, arch in enumerate(p.students):
        step = OursStep(teacher, arch, ctx.device, None, channels_last=False)
        role = "baseline" if i == 0 else "variant"
        variants.append(steps_variant(arch, step, [(x, index) for x in u8], p.step_iters, role, arch))
    return measure("students", with_repeat(variants), p.rounds, ctx.device, "images")
