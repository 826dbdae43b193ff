"""Speed benchmark: the original recipe against ours, stage by stage, in one run.

    python -m tools.benchmark --profile cpu --json bench_cpu.json     # under 3 minutes on 2 CPU cores
    python -m tools.benchmark --profile gpu --json bench_gpu.json     # under 6 minutes on one H100
    python -m tools.benchmark --profile gpu --dry_run                 # tiny sizes, every code path, any device

Stages (``--stages``, default all): ``data`` (loader workers only: decode, crop, collate, on generated
ImageNet-like JPEGs), ``step`` (one distillation step on synthetic on-device batches), ``e2e`` (loader +
step), ``cached`` (step with targets gathered from a cached teacher array), ``knn`` (k-NN search and
vote), ``probe`` (cached linear probe). In every stage the baseline (the original recipe,
:mod:`tools.original_recipe`), our variants and the baseline once more (its second slot is the noise
floor) run interleaved, round after round. A row's ``img_s`` is the median rate over the rounds (items
per second: images, queries or feature rows), ``spread`` is (max - min) / median over the rounds and
``ratio_vs_baseline`` divides by the baseline's median. ``--json`` writes the rows as a list.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.datasets import IndexedImageFolder
from data.decode import DECODERS
from data.loaders import EpochSampler, build_loader
from data.synthetic import make_jpeg_folder
from data.transforms import TrainViews
from models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_encoder
from models.errors import UserError
from models.fold import compile_frozen
from models.io import write_json
from models.student import Student
from models.teachers import Teacher
from tools.bench.baseline import (
    OriginalCachedProbe,
    OriginalFolder,
    OriginalStep,
    build_original_pair,
    original_loader,
)
from tools.bench.device_decode import (
    EncodedCrops,
    collate_encoded,
    dali_available,
    dali_iterator,
    decode_crop_resize_batch,
)
from tools.engine.cli import add_debug_flag, run_cli
from tools.engine.distributed import DistInfo
from tools.engine.logs import setup_logging
from tools.engine.step import StepConfig, build_optimizer, distill_step
from tools.eval.knn import default_chunk, knn_search

log = logging.getLogger("simreg.benchmark")


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. Defaults: the CPU profile (2 cores, under 3 minutes)."""

    images: int = 256  # generated JPEGs (quality 90)
    jpeg_size: tuple[int, int] = (500, 375)  # ImageNet's typical size
    crop: int = 224  # data stage crop size
    workers: int = 2  # loader processes = cores used by the data stage
    data_batch: int = 32
    teacher: str = "resnet50"
    student: str = "resnet18"
    step_size: int = 64  # step, cached and e2e stages: image size and batch
    step_batch: int = 16
    step_iters: int = 1  # steps per timed round
    e2e_batches: int = 2  # loader batches per timed round
    cache_rows: int = 50_000  # cached teacher array (rows, teacher dim) in fp16 on the device
    knn_train: int = 50_000
    knn_queries: int = 1_000
    knn_dim: int = 512
    knn_k: int = 20
    probe_rows: int = 50_000
    probe_dim: int = 512
    probe_classes: int = 100
    probe_steps: int = 100  # optimisation steps (batch 256) per timed round
    rounds: int = 5
    # torch threads of the main process: on a shared 2-core machine, two threads stall (busy-waiting)
    # whenever another process holds a core, by 10-50x; one thread gives stable per-core figures.
    threads: int | None = 1  # None: torch's default
    compile: bool = False  # torch.compile variants (minutes of compilation on 2 CPU cores: off)
    device_decode: bool = False  # batched decode_jpeg on the device (and DALI when installed)
    needs_cuda: bool = False


PROFILES = {
    "cpu": Profile(),
    "gpu": Profile(
        images=4096,
        workers=16,
        data_batch=256,
        step_size=224,
        step_batch=256,
        step_iters=10,
        e2e_batches=16,
        cache_rows=1_281_167,
        knn_train=1_281_167,
        knn_queries=10_000,
        probe_rows=1_281_167,
        probe_classes=1000,
        probe_steps=1000,
        rounds=3,
        threads=None,
        compile=True,
        device_decode=True,
        needs_cuda=True,
    ),
}
# --dry_run: the chosen profile's code paths at toy sizes (seconds on a CPU).
DRY_RUN = {
    "images": 8,
    "crop": 32,
    "workers": 1,
    "data_batch": 4,
    "teacher": "resnet18",
    "step_size": 32,
    "step_batch": 4,
    "step_iters": 1,
    "e2e_batches": 2,
    "cache_rows": 64,
    "knn_train": 300,
    "knn_queries": 20,
    "knn_dim": 16,
    "knn_k": 5,
    "probe_rows": 300,
    "probe_dim": 16,
    "probe_classes": 10,
    "probe_steps": 2,
    "rounds": 2,
    "threads": 1,
}


@dataclass
class Context:
    """What the stages share: the device, the JPEG folder, the models built so far, the rows so far."""

    device: torch.device
    train_dir: str
    compile_backend: str
    ours: dict = field(default_factory=dict)  # our step configurations, built once
    original: OriginalStep | None = None
    rows: list = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host clocks time finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============ timing: interleaved rounds, baseline repeated ============
@dataclass
class Variant:
    """One configuration of a stage. ``run()`` does one timed unit of work and returns the items done."""

    name: str
    run: Callable[[], int] | None  # None: skipped, ``note`` says why
    role: str = "variant"  # baseline | repeat | variant | component (a part of a variant: no ratio)
    note: str = ""


def measure(stage: str, variants: list[Variant], rounds: int, device: torch.device, unit: str) -> list[dict]:
    """Warm every variant up once, then time them in turn for ``rounds`` rounds; one row per variant."""
    live = [v for v in variants if v.run is not None]
    for v in live:
        if v.role != "repeat":  # the repeat shares the baseline's runner
            log.info("%s: warming up %s", stage, v.name)
            v.run()
    rates: dict[str, list[float]] = {v.name: [] for v in live}
    for r in range(rounds):
        for v in live:
            synchronize(device)
            start = time.perf_counter()
            n = v.run()
            synchronize(device)
            rates[v.name].append(n / (time.perf_counter() - start))
        log.info("%s: round %d/%d done", stage, r + 1, rounds)
    base = statistics.median(next(rates[v.name] for v in live if v.role == "baseline"))
    rows = []
    for v in variants:
        row = {"stage": stage, "config": v.name, "role": v.role, "unit": unit, "note": v.note}
        if v.run is None:
            rows.append({**row, "img_s": None, "ratio_vs_baseline": None, "spread": None, "skipped": True})
            continue
        med = statistics.median(rates[v.name])
        spread = (max(rates[v.name]) - min(rates[v.name])) / med
        ratio = None if v.role == "component" else med / base
        rows.append({**row, "img_s": med, "ratio_vs_baseline": ratio, "spread": spread, "rounds": rates[v.name]})
    return rows


def with_repeat(variants: list[Variant]) -> list[Variant]:
    """Append the baseline's second slot (same runner, timed at the end of each round: the noise floor)."""
    base = variants[0]
    return [*variants, Variant(base.name + " (repeat)", base.run, "repeat", "noise floor")]


class Cycle(Dataset):
    """``dataset`` read round and round to ``length`` samples (keys: int or (index, epoch))."""

    def __init__(self, dataset, length: int) -> None:
        self.dataset, self.length, self.samples = dataset, length, getattr(dataset, "samples", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(key[0] % len(self.dataset), key[1])]
        return self.dataset[key % len(self.dataset)]


def encoded_loader(train_dir: str, batch: int, workers: int, length: int | None = None) -> DataLoader:
    """Workers read JPEG bytes and draw the crop boxes; decoding happens on the device in the main process."""
    ds = EncodedCrops(IndexedImageFolder(train_dir))
    ds = Cycle(ds, length) if length else ds
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=EpochSampler(len(ds)),
        num_workers=workers,
        collate_fn=collate_encoded,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def identity(x):
    """A loader batch as it comes."""
    return x


def loader_variant(name: str, loader, step: Callable | None, unpack: Callable, role: str = "variant") -> Variant:
    """One epoch of ``loader``; each batch goes through ``unpack`` and then ``step`` (when given)."""

    def run() -> int:
        n = 0
        for batch in loader:
            args = unpack(batch)
            if step is not None:
                step(*args)
            n += loader.batch_size
        return n

    return Variant(name, run, role)


# ============ stage: data pipeline only ============
def stage_data(p: Profile, ctx: Context) -> list[dict]:
    """Images/s of the loader workers: the original float pipeline against our uint8 decoders."""
    folder = IndexedImageFolder(ctx.train_dir)
    base = original_loader(OriginalFolder(folder, p.crop), p.data_batch, p.workers, pin_memory=False)
    variants = [loader_variant("original: PIL float32 crops, view x2", base, None, identity, "baseline")]
    for name in DECODERS:
        ds = IndexedImageFolder(ctx.train_dir, TrainViews(p.crop, True, True, False, decode=name))
        loader = build_loader(ds, p.data_batch, num_workers=p.workers)
        variants.append(loader_variant(f"ours: uint8 crops, decode={name}", loader, None, identity))
    variants += device_decode_variants(p, ctx)
    rows = measure("data", with_repeat(variants), p.rounds, ctx.device, "images")
    for row in rows:
        row["img_s_per_core"] = row["img_s"] / p.workers if row["img_s"] else None
        row["workers"] = p.workers
    return rows


def device_decode_variants(p: Profile, ctx: Context) -> list[Variant]:
    """Batched decode_jpeg on the device (crop and resize there too) and NVIDIA DALI when installed."""
    if not p.device_decode:
        return []
    loader = encoded_loader(ctx.train_dir, p.data_batch, p.workers)

    def decoded(b):
        return decode_crop_resize_batch(b[0], b[1], b[2], p.crop, ctx.device)

    out = [loader_variant(f"ours: batched decode_jpeg on {ctx.device.type}", loader, None, decoded)]
    if not (dali_available() and ctx.device.type == "cuda"):
        return out + [Variant("DALI (mixed decode, own crops)", None, note="skipped: nvidia.dali not installed")]
    folder = IndexedImageFolder(ctx.train_dir)
    files = [os.path.join(folder.root, rel) for rel, _ in folder.samples]
    it = dali_iterator(files, p.data_batch, p.crop, p.workers, ctx.device.index or 0)

    def run_dali() -> int:
        return sum(batch[0]["images"].shape[0] for batch in it)

    note = "its own random crops (same distribution), not our per-sample boxes"
    return out + [Variant("DALI (mixed decode, own crops)", run_dali, note=note)]


# ============ stage: the step on synthetic on-device batches ============
class OursStep:
    """Our training step exactly as train_student.py runs it (``distill_step``), on random weights."""

    def __init__(self, p: Profile, device: torch.device, amp: torch.dtype | None, compile_backend: str | None):
        teacher = Teacher(build_encoder(p.teacher), p.teacher, "random").to(device)
        student = Student(p.student, teacher.feat_dim).to(device)
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
        self.model = student
        if compile_backend:  # as --compile and --compile_teacher do
            teacher.encoder = compile_frozen(teacher.encoder, backend=compile_backend)
            self.model = torch.compile(student, backend=compile_backend)
        self.teacher = teacher
        self.optimizer = build_optimizer(student.parameters(), 0.05, 0.9, 1e-4, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.cfg = StepConfig(DistInfo(device=device), amp, channels_last=True, print_freq=1 << 30)

    def __call__(self, views, index: torch.Tensor) -> torch.Tensor:
        return distill_step(self.model, self.teacher, views, index, self.optimizer, self.scaler, self.cfg)

    def with_teacher(self, teacher) -> OursStep:
        """The same student and optimizer with another teacher (e.g. a cached one)."""
        clone = copy.copy(self)
        clone.teacher = teacher
        return clone


def normalised_pair(u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's loader output: two identical float32 normalised batches (B, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=u8.device).view(1, 3, 1, 1)
    x = (u8.float() / 255 - mean) / std
    return x, x.clone()


def steps_variant(name: str, step: Callable, batches: list, p: Profile, role: str = "variant") -> Variant:
    """``p.step_iters`` calls of ``step(*batch)``, cycling through ``batches``."""

    def run() -> int:
        for i in range(p.step_iters):
            step(*batches[i % len(batches)])
        return p.step_iters * p.step_batch

    return Variant(name, run, role)


def ours_steps(p: Profile, ctx: Context) -> dict[str, OursStep]:
    """Our step in its configurations (built once, shared by the later stages)."""
    if not ctx.ours:
        ctx.ours["ours: fp32, channels_last, no sync"] = OursStep(p, ctx.device, None, None)
        ctx.ours["ours: bf16, channels_last, no sync"] = OursStep(p, ctx.device, torch.bfloat16, None)
        if p.compile:
            name = f"ours: bf16, channels_last, compiled ({ctx.compile_backend})"
            ctx.ours[name] = OursStep(p, ctx.device, torch.bfloat16, ctx.compile_backend)
    return ctx.ours


def best_step(p: Profile, ctx: Context) -> str:
    """Our fastest step configuration as measured by the step stage (else bf16 on CUDA, fp32 on CPU)."""
    ours = ours_steps(p, ctx)
    measured = [r for r in ctx.rows if r["stage"] == "step" and r["config"] in ours and r["img_s"]]
    if measured:
        return max(measured, key=lambda r: r["img_s"])["config"]
    return [k for k in ours if ("bf16" in k) == (ctx.device.type == "cuda")][-1]


def original_step(p: Profile, ctx: Context) -> OriginalStep:
    if ctx.original is None:
        teacher, student = build_original_pair(p.teacher, p.student, ctx.device)
        ctx.original = OriginalStep(teacher, student, ctx.device)
    return ctx.original


def synthetic_batches(p: Profile, device: torch.device) -> list[torch.Tensor]:
    """Three distinct random uint8 batches (B, 3, S, S) on the device (never zeros)."""
    shape = (p.step_batch, 3, p.step_size, p.step_size)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for _ in range(3)]


def stage_step(p: Profile, ctx: Context) -> list[dict]:
    """Images/s of one distillation step on batches already on the device (no loader)."""
    u8 = synthetic_batches(p, ctx.device)
    pairs = [normalised_pair(x) for x in u8]
    name = "original: fp32 NCHW, MoCo shuffle, sync per step"
    variants = [steps_variant(name, original_step(p, ctx), pairs, p, "baseline")]
    index = torch.arange(p.step_batch)
    for name, step in ours_steps(p, ctx).items():
        variants.append(steps_variant(name, step, [(x, index) for x in u8], p))
    if not p.compile:
        variants.append(Variant("ours: compiled", None, note="skipped: compilation is off in this profile"))
    return measure("step", with_repeat(variants), p.rounds, ctx.device, "images")


# ============ stage: the step with a cached teacher ============
class CachedTargets(nn.Module):
    """A cached teacher's ``targets(images, indices)``: rows of an (N, D) fp16 array on the device.

    Mirrors the gather of tools/teacher_cache.py (issue 3) with the whole array resident on the device.
    """

    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats = feats

    def targets(self, images: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:  # -> (B, D) fp32
        return self.feats.index_select(0, indices).float()


def gather_seconds(cache: CachedTargets, p: Profile, device: torch.device, reps: int = 50) -> float:
    """Mean time of one batch's gather (B random rows), host indices copied over as a loader hands them."""
    idx = [torch.randint(0, cache.feats.shape[0], (p.step_batch,)) for _ in range(reps)]
    cache.targets(None, idx[0].to(device))
    synchronize(device)
    start = time.perf_counter()
    for i in idx:
        cache.targets(None, i.to(device, non_blocking=True))
    synchronize(device)
    return (time.perf_counter() - start) / reps


def stage_cached(p: Profile, ctx: Context) -> list[dict]:
    """Images/s of the step when the targets come from a cached (N, D) fp16 teacher array on the device."""
    dim = build_encoder(p.teacher).feat_dim
    cache = CachedTargets(torch.empty(p.cache_rows, dim, dtype=torch.float16, device=ctx.device).normal_())
    u8 = synthetic_batches(p, ctx.device)
    batches = [(x, torch.randint(0, p.cache_rows, (p.step_batch,))) for x in u8]
    pairs = [normalised_pair(x) for x in u8]
    variants = [steps_variant("original: live teacher, fp32", original_step(p, ctx), pairs, p, "baseline")]
    best = best_step(p, ctx)
    live = ours_steps(p, ctx)[best]
    variants.append(steps_variant(best.replace("ours:", "ours: live teacher,"), live, batches, p))
    name = best.replace("ours:", "ours: cached teacher,")
    variants.append(steps_variant(name, live.with_teacher(cache), batches, p))
    rows = measure("cached", with_repeat(variants), p.rounds, ctx.device, "images")
    gather = gather_seconds(cache, p, ctx.device)
    for row in rows:
        if row["config"] == name:
            row["gather_ms"] = gather * 1e3
            row["gather_fraction_of_step"] = gather / (p.step_batch / row["img_s"])
            row["cache_gb"] = cache.feats.numel() * 2 / 1e9
    return rows


# ============ stage: end to end (loader + step) ============
def e2e_variants(p: Profile, ctx: Context, best: str) -> list[Variant]:
    """Original loader + step, ours (CPU decode, and device decode), and each of our loaders alone."""
    pin, length = ctx.device.type == "cuda", p.e2e_batches * p.step_batch
    folder = IndexedImageFolder(ctx.train_dir)
    base = original_loader(Cycle(OriginalFolder(folder, p.step_size), length), p.step_batch, p.workers, pin)
    step = ours_steps(p, ctx)[best]
    tag = best.removeprefix("ours: ").replace(", no sync", "").replace("channels_last, ", "")
    views = TrainViews(p.step_size, True, True, False, decode="auto")
    ds = Cycle(IndexedImageFolder(ctx.train_dir, views), length)
    loader = build_loader(ds, p.step_batch, num_workers=p.workers, pin_memory=pin)
    variants = [
        loader_variant(
            "original: float32 x2 loader + original step", base, original_step(p, ctx), lambda b: b[0], "baseline"
        ),
        loader_variant(f"ours: decode=auto loader + step ({tag})", loader, step, lambda b: (b[0], b[2])),
        loader_variant("ours: decode=auto loader alone", loader, None, identity, "component"),
    ]
    if p.device_decode:
        enc = encoded_loader(ctx.train_dir, p.step_batch, p.workers, length)

        def decoded(b):
            return decode_crop_resize_batch(b[0], b[1], b[2], p.step_size, ctx.device), b[4]

        dev = ctx.device.type
        variants.append(loader_variant(f"ours: decode on {dev} + step ({tag})", enc, step, decoded))
        variants.append(loader_variant(f"ours: decode on {dev} alone", enc, None, decoded, "component"))
    return variants


def stage_e2e(p: Profile, ctx: Context) -> list[dict]:
    """Images/s of loader + step together, and which side bounds it (the loader alone vs the step alone)."""
    best = best_step(p, ctx)
    rows = measure("e2e", with_repeat(e2e_variants(p, ctx, best)), p.rounds, ctx.device, "images")
    step_rate = next((r["img_s"] for r in ctx.rows if r["stage"] == "step" and r["config"] == best), None)
    for row, alone in zip(rows, rows[1:], strict=False):
        if row["role"] == "variant" and "+ step" in row["config"] and alone["config"].endswith(" alone"):
            row.update(loader_img_s=alone["img_s"], step_img_s=step_rate)
            if step_rate:
                row["bound"] = "data" if alone["img_s"] < step_rate else "step"
    return rows


# ============ k-NN search and cached linear probe ============
# Ours is the project's own search (tools.knn.knn_search); knn_topk is only the DINO-style baseline for devices
# where faiss cannot run.
def knn_topk(train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine k-NN by chunked matrix products: (Q, k) similarities and train indices, best first.

    ``train`` (N, D) and ``queries`` (Q, D) are L2-normalised; memory holds one (chunk, N) score block.
    """
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s, i = (queries[start : start + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def knn_indices(train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(Q, k) train indices of the k nearest neighbours, best first."""
    return knn_topk(train, queries, k, chunk)[1]


def majority_vote(neighbour_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(Q, k) neighbour labels -> (Q,) most frequent label (ties: the lowest label)."""
    counts = torch.zeros(neighbour_labels.shape[0], n_classes, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels, dtype=counts.dtype))
    return counts.argmax(1)


def faiss_search(index, queries: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, k) neighbour indices from a faiss index (queries copied to host memory as faiss needs)."""
    _, idx = index.search(queries.cpu().numpy(), k)
    return torch.from_numpy(idx)


def baseline_search(p: Profile, train: torch.Tensor, queries: torch.Tensor) -> tuple[str, Callable, str]:
    """The original's search (a faiss flat L2 index) where it can run here, else DINO-style small chunks."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None and train.device.type == "cpu":  # the original used faiss-gpu on GPUs
        faiss.omp_set_num_threads(torch.get_num_threads())  # the same cores as the torch search
        flat = faiss.IndexFlatL2(p.knn_dim)
        flat.add(train.numpy())
        return "original: faiss IndexFlatL2", partial(faiss_search, flat, queries, p.knn_k), ""
    note = "no faiss for this device: DINO-style 100-query chunks instead"
    return "original-style: torch, 100-query chunks", partial(knn_indices, train, queries, p.knn_k, 100), note


def stage_knn(p: Profile, ctx: Context) -> list[dict]:
    """Queries/s of exact k-NN search + majority vote over L2-normalised features (1000 classes)."""
    dev, n_classes = ctx.device, 1000
    train = F.normalize(torch.randn(p.knn_train, p.knn_dim, device=dev), dim=1)
    labels = torch.randint(0, n_classes, (p.knn_train,), device=dev)
    queries = F.normalize(torch.randn(p.knn_queries, p.knn_dim, device=dev), dim=1)

    def run(search: Callable[[], torch.Tensor]) -> int:
        majority_vote(labels[search().to(dev)], n_classes)
        return p.knn_queries

    base_name, base_search, note = baseline_search(p, train, queries)

    def ours_search() -> torch.Tensor:
        return knn_search(train, queries, p.knn_k, backend="torch", device=dev)[1]

    variants = [
        Variant(base_name, partial(run, base_search), "baseline", note),
        Variant(
            f"ours: tools.knn torch backend, {default_chunk(p.knn_train, dev)}-query blocks", partial(run, ours_search)
        ),
    ]
    rows = measure("knn", with_repeat(variants), p.rounds, dev, "queries")
    same = (base_search()[:, 0].cpu() == ours_search()[:, 0].cpu()).float().mean().item()
    for row in rows:
        row.update(train_rows=p.knn_train, dim=p.knn_dim, k=p.knn_k, same_top1_as_baseline=same)
    return rows


class DeviceProbe:
    """Our cached linear probe: features resident on the device, batches gathered there, no host sync."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, n_classes: int, batch: int = 256) -> None:
        self.feats, self.labels, self.batch = feats, labels, batch
        self.linear = nn.Linear(feats.shape[1], n_classes).to(feats.device)
        self.optimizer = build_optimizer(self.linear.parameters(), 0.01, 0.9, 1e-4, feats.device)
        self.order, self.pos = torch.randperm(feats.shape[0], device=feats.device), 0

    def run(self, steps: int) -> int:
        for _ in range(steps):
            if self.pos + self.batch > self.order.numel():
                self.order, self.pos = torch.randperm(self.order.numel(), device=self.order.device), 0
            idx = self.order[self.pos : self.pos + self.batch]
            self.pos += self.batch
            loss = F.cross_entropy(self.linear(self.feats.index_select(0, idx)), self.labels.index_select(0, idx))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return steps * self.batch


def stage_probe(p: Profile, ctx: Context) -> list[dict]:
    """Feature rows/s of the cached linear probe (batch 256, SGD), plus the implied 40-epoch time."""
    feats = torch.randn(p.probe_rows, p.probe_dim, device=ctx.device)
    labels = torch.randint(0, p.probe_classes, (p.probe_rows,), device=ctx.device)
    base = OriginalCachedProbe(feats, labels, p.probe_classes, 256, ctx.device)
    ours = DeviceProbe(feats, labels, p.probe_classes)
    variants = [
        Variant("original: host TensorDataset, sync per step", partial(base.run, p.probe_steps), "baseline"),
        Variant("ours: device-resident features, fused SGD", partial(ours.run, p.probe_steps)),
    ]
    rows = measure("probe", with_repeat(variants), p.rounds, ctx.device, "feature rows")
    for row in rows:
        if row["img_s"]:
            row["forty_epochs_s"] = 40 * p.probe_rows / row["img_s"]
            row["rows"] = p.probe_rows
    return rows


STAGES: dict[str, Callable[[Profile, Context], list[dict]]] = {
    "data": stage_data,
    "step": stage_step,
    "e2e": stage_e2e,
    "cached": stage_cached,
    "knn": stage_knn,
    "probe": stage_probe,
}


# ============ entry point ============
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimReg speed benchmark", add_help=add_help)
    p.add_argument("--profile", default="cpu", choices=list(PROFILES), help="sizes: cpu (2 cores) or gpu (one H100)")
    p.add_argument("--dry_run", action="store_true", help="toy sizes: every code path of the profile in seconds")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    p.add_argument("--work_dir", default=None, help="where the generated JPEGs go (default: the temp folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per stage (default: the profile's)")
    p.add_argument("--images", type=int, default=None, help="number of generated JPEGs (default: the profile's)")
    p.add_argument("--jpeg_size", default=None, help="generated JPEG size WIDTHxHEIGHT (default 500x375)")
    p.add_argument("--crop", type=int, default=None, help="data stage crop size (default: the profile's, 224)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: profile's)")
    p.add_argument("--seed", type=int, default=0)
    add_debug_flag(p)
    return p


def resolve(args) -> tuple[Profile, torch.device, list[str]]:
    """The profile (with --dry_run / --rounds applied), the device and the stages; user mistakes are errors."""
    prof = PROFILES[args.profile]
    if args.dry_run:
        prof = dataclasses.replace(prof, **DRY_RUN)
    if args.rounds:
        prof = dataclasses.replace(prof, rounds=args.rounds)
    if args.crop:
        prof = dataclasses.replace(prof, crop=args.crop)
    if args.images:
        prof = dataclasses.replace(prof, images=args.images)
    if args.jpeg_size:
        try:
            width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
        except ValueError as exc:
            raise UserError(f"--jpeg_size {args.jpeg_size} is not WIDTHxHEIGHT (e.g. 500x375)") from exc
        prof = dataclasses.replace(prof, jpeg_size=(width, height))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asks for CUDA, which this machine lacks; use --device cpu")
    if prof.needs_cuda and device.type != "cuda" and not args.dry_run:
        raise UserError(
            f"--profile {args.profile} needs a CUDA device; use --profile cpu, or add --dry_run to exercise its code"
        )
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)} in --stages; choose from {', '.join(STAGES)}")
    return prof, device, stages


def machine_info(device: torch.device) -> dict:
    """What the rows were measured on: device name, cores, torch version, date."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": f"{device.type}: {name}",
        "cpu_cores": cores,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def row_remark(r: dict) -> str:
    if r["img_s"] is None:
        return r["note"]
    if "bound" in r:
        return f"bound: {r['bound']} (loader alone {r['loader_img_s']:.0f}/s, step alone {r['step_img_s']:.0f}/s)"
    if "gather_fraction_of_step" in r:
        return f"gather {r['gather_ms']:.3f} ms = {r['gather_fraction_of_step']:.3%} of a step"
    if "img_s_per_core" in r:
        return f"{r['img_s_per_core']:.0f}/s per worker core"
    if "forty_epochs_s" in r:
        return f"40 epochs of {r['rows']} rows: {r['forty_epochs_s']:.0f} s"
    return r["note"]


def print_table(rows: list[dict], info: dict) -> None:
    """The summary: one line per row, rates as medians over the rounds."""
    print(f"\n{info['device']} | {info['cpu_cores']} CPU cores | torch {info['torch']} | {info['date']}")
    print(f"{'stage':<7} {'config':<66} {'rate/s':>10} {'ratio':>6} {'spread':>7}")
    for r in rows:
        name = r["config"][:66]
        if r["img_s"] is None:
            print(f"{r['stage']:<7} {name:<66} {'-':>10} {'-':>6} {'-':>7}  {row_remark(r)}")
            continue
        ratio = "-" if r["ratio_vs_baseline"] is None else f"{r['ratio_vs_baseline']:.2f}"
        rate, spread = f"{r['img_s']:.1f}", f"{r['spread']:.1%}"
        print(f"{r['stage']:<7} {name:<66} {rate:>10} {ratio:>6} {spread:>7}  {row_remark(r)}")


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging(None, True, args.debug)
    prof, device, stages = resolve(args)
    threads = torch.get_num_threads()
    if args.threads or prof.threads:
        torch.set_num_threads(args.threads or prof.threads)
    try:
        rows = run_stages(args, prof, device, stages)
    finally:
        torch.set_num_threads(threads)
    print_table(rows, rows[0] if rows else machine_info(device))
    if args.json:
        print(f"rows written to {args.json}")
    failed = [r["stage"] for r in rows if r.get("failed")]
    if failed:
        raise RuntimeError(f"benchmark stage(s) {', '.join(failed)} failed; see the log above")
    return rows


def run_stages(args: argparse.Namespace, prof: Profile, device: torch.device, stages: list[str]) -> list[dict]:
    """Generate (or reuse) the JPEGs and run the stages in order; ``--json`` is rewritten after each stage."""
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "simreg_bench")
    width, height = prof.jpeg_size
    root = os.path.join(work, f"jpegs_{prof.images}_{width}x{height}")
    log.info("generating %d JPEGs under %s (kept for the next run)", prof.images, root)
    procs = max(1, min(prof.workers, os.cpu_count() or 1))
    made = make_jpeg_folder(root, prof.images, size=prof.jpeg_size, processes=procs)
    log.info("JPEGs: %d files of %dx%d, %.1f KB on average", prof.images, width, height, made["mean_kb"])
    ctx = Context(device, os.path.join(root, "train"), "inductor" if device.type == "cuda" else "aot_eager")
    meta = {
        "profile": args.profile + (" (dry run)" if args.dry_run else ""),
        **machine_info(device),
        "torch_threads": torch.get_num_threads(),
        "jpeg_kb": made["mean_kb"],
        "jpeg_size": f"{width}x{height}",
        "crop": prof.crop,
    }
    rows: list[dict] = []
    for name in stages:
        log.info("stage %s", name)
        try:
            stage_rows = STAGES[name](prof, ctx)
        except Exception as exc:  # one broken stage must not cost a device session the others
            log.exception("stage %s failed", name)
            note = f"failed: {type(exc).__name__}: {exc}"[:300]
            stage_rows = [{"stage": name, "config": "stage failed", "role": "baseline", "note": note, "img_s": None}]
            stage_rows[0].update(ratio_vs_baseline=None, spread=None, skipped=True, failed=True)
        ctx.rows += stage_rows
        rows += [{**r, **meta} for r in stage_rows]
        if args.json:  # a run cut short (a time limit) still leaves the stages it finished
            write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
