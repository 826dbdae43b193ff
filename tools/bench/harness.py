"""The benchmark's machinery: profiles (sizes), interleaved timing with a repeated baseline, the table.

Every stage builds :class:`Variant` s (the original recipe first) and hands them to :func:`measure`:
each is warmed up once, then all run in turn, round after round, and the baseline runs once more at
the end of each round (its ``(repeat)`` row is the stage's noise floor). A row's ``img_s`` is the median
rate over the rounds, ``spread`` (max - min) / median, ``ratio_vs_baseline`` the median over the
baseline's median. Each row carries a ``key`` (``stage.name``) that code reading the JSON relies on.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from data.synthetic import make_jpeg_folder
from models.io import write_json

log = logging.getLogger("simreg.benchmark")


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. Defaults: the CPU profile (2 cores, about 2 minutes)."""

    images: int = 256  # generated JPEGs (quality 90)
    jpeg_size: tuple[int, int] = (500, 375)  # ImageNet's typical size
    crop: int = 224  # data stage crop size
    workers: int = 2  # loader processes = cores used by the data stage
    data_batch: int = 32
    decoders: tuple[str, ...] = ("auto", "pil", "draft", "tv")  # CPU decoders of the data stage
    teacher: str = "resnet50"
    student: str = "resnet18"
    step_size: int = 64  # step, cached and e2e stages: image size and batch
    step_batch: int = 16
    step_iters: int = 1  # steps per timed round
    e2e_batches: int = 2  # loader batches per timed round
    cache_rows: int = 50_000  # the R50 teacher's cache (rows x 2048 float16), memory-mapped and on the device
    x4_rows: int = 16_384  # a SimCLR-x4 cache (rows x 8192) for the ResNet-50 student row
    knn_train: int = 50_000
    knn_queries: int = 1_000
    knn_dim: int = 512
    knn_k: int = 20
    probe_rows: int = 50_000  # ours: one epoch of these rows per round
    probe_dim: int = 512
    probe_classes: int = 100
    probe_baseline_steps: int = 100  # the original's probe: this many steps (batch 256) per round
    rounds: int = 5
    # torch threads of the main process: on a shared 2-core machine, two threads stall (busy-waiting)
    # whenever another process holds a core, by 10-50x; one thread gives stable per-core figures.
    threads: int | None = 1  # None: torch's default
    compile: bool = False  # torch.compile variants (minutes of compilation on 2 CPU cores: off)
    device_decode: bool = False  # --decode gpu (batched decode_jpeg on the device) and DALI when installed
    needs_cuda: bool = False


PROFILES = {
    "cpu": Profile(),
    "gpu": Profile(
        images=4096,
        workers=16,
        data_batch=256,
        decoders=("auto",),  # the decoder choice is measured on the CPU profile
        step_size=224,
        step_batch=256,
        step_iters=6,
        e2e_batches=8,
        cache_rows=1_281_167,
        x4_rows=131_072,
        knn_train=1_281_167,
        knn_queries=5_000,
        probe_rows=1_281_167,
        probe_classes=1000,
        probe_baseline_steps=300,
        rounds=2,  # the call that runs it has about 3 minutes for this profile
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
    "x4_rows": 64,
    "knn_train": 300,
    "knn_queries": 20,
    "knn_dim": 16,
    "knn_k": 5,
    "probe_rows": 300,
    "probe_dim": 16,
    "probe_classes": 10,
    "probe_baseline_steps": 2,
    "rounds": 2,
    "threads": 1,
}


@dataclass
class Context:
    """What the stages share: the device, the folders, the models built so far, the rows so far."""

    device: torch.device
    train_dir: str  # generated JPEGs (ImageFolder layout)
    work_dir: str  # where generated files (cache arrays) are kept for the next run
    compile_backend: str
    ours: dict = field(default_factory=dict)  # our step configurations, built once
    original: object | None = None  # the original recipe's step, built once
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
    role: str = "variant"  # baseline | repeat | variant | component (a part of a variant) | other (other work)
    note: str = ""
    key: str = ""  # short id for code reading the rows (e.g. "cpu" -> row key "data.cpu")


NO_RATIO = ("component", "other")  # a part of a variant, or another workload than the baseline's


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
        row["key"] = f"{stage}.{v.key or v.role}"
        if v.run is None:
            rows.append({**row, "img_s": None, "ratio_vs_baseline": None, "spread": None, "skipped": True})
            continue
        med = statistics.median(rates[v.name])
        spread = (max(rates[v.name]) - min(rates[v.name])) / med
        ratio = None if v.role in NO_RATIO else med / base
        rows.append({**row, "img_s": med, "ratio_vs_baseline": ratio, "spread": spread, "rounds": rates[v.name]})
    return rows


def with_repeat(variants: list[Variant]) -> list[Variant]:
    """Append the baseline's second slot (same runner, timed at the end of each round: the noise floor)."""
    base = variants[0]
    return [*variants, Variant(base.name + " (repeat)", base.run, "repeat", "noise floor", "repeat")]


def loader_variant(
    name: str, loader, step: Callable | None, unpack: Callable, role: str = "variant", key: str = ""
) -> Variant:
    """One epoch of ``loader``; each batch goes through ``unpack`` and then ``step`` (when given)."""

    def run() -> int:
        n = 0
        for batch in loader:
            args = unpack(batch)
            if step is not None:
                step(*args)
            n += loader.batch_size
        return n

    return Variant(name, run, role, key=key)


def identity(x):
    """A loader batch as it comes."""
    return x


def steps_variant(
    name: str, step: Callable, batches: list, iters: int, role: str = "variant", key: str = ""
) -> Variant:
    """``iters`` calls of ``step(*batch)``, cycling through ``batches``; items = images of those batches."""

    def run() -> int:
        n = 0
        for i in range(iters):
            batch = batches[i % len(batches)]
            step(*batch)
            n += len(batch[0])
        return n

    return Variant(name, run, role, key=key)


class Cycle(torch.utils.data.Dataset):
    """``dataset`` read round and round to ``length`` samples (keys: int or (index, epoch))."""

    def __init__(self, dataset, length: int) -> None:
        self.dataset, self.length, self.samples = dataset, length, getattr(dataset, "samples", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.dataset[(key[0] % len(self.dataset), key[1])]
        return self.dataset[key % len(self.dataset)]


# ============ inputs, machine, results ============
def jpeg_root(work_dir: str, images: int, size: tuple[int, int]) -> str:
    """The folder of a generated JPEG set (``<root>/train/<class>/``); the main-job check shares it."""
    return os.path.join(work_dir, f"jpegs_{images}_{size[0]}x{size[1]}")


def prepare_jpegs(work_dir: str, images: int, size: tuple[int, int], workers: int) -> dict:
    """Generate (or reuse) the JPEG set; returns its manifest (``mean_kb``) with ``root``."""
    root = jpeg_root(work_dir, images, size)
    log.info("generating %d JPEGs under %s (kept for the next run)", images, root)
    made = make_jpeg_folder(root, images, size=size, processes=max(1, min(workers, os.cpu_count() or 1)))
    log.info("JPEGs: %d files of %dx%d, %.1f KB on average", images, size[0], size[1], made["mean_kb"])
    return {**made, "root": root}


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


def run_stages(stages: dict[str, Callable], prof: Profile, ctx: Context, meta: dict, json_path: str | None) -> list:
    """Run ``stages`` in order; a failing stage is recorded and the others still run.

    ``json_path`` is rewritten after each stage, so a run cut short (a time limit) keeps what it finished.
    """
    rows: list[dict] = []
    for name, stage in stages.items():
        log.info("stage %s", name)
        try:
            stage_rows = stage(prof, ctx)
        except Exception as exc:  # one broken stage must not cost a device session the others
            log.exception("stage %s failed", name)
            note = f"failed: {type(exc).__name__}: {exc}"[:300]
            stage_rows = [{"stage": name, "config": "stage failed", "role": "baseline", "note": note, "img_s": None}]
            stage_rows[0].update(key=f"{name}.failed", ratio_vs_baseline=None, spread=None, skipped=True, failed=True)
        ctx.rows += stage_rows
        rows += [{**r, **meta} for r in stage_rows]
        if json_path:
            write_json(json_path, rows)
    return rows


def row_remark(r: dict) -> str:
    """The table's last column: what else the row measured."""
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
