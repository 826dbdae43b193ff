"""The benchmark's machinery: the one timing loop, running a profile's stages, the rows and the table.

Every timed figure goes through :func:`timed` (the clock: the device synchronised before and after, wall
and process CPU seconds). Timing stages build :class:`Variant` s (the baseline first) and hand them to
:func:`measure`, the one timing loop: each is warmed up once, then all run in turn, round after round,
and the baseline runs once more at the end of each round (its ``(repeat)`` row is the stage's noise
floor). A row's ``img_s`` is the median rate over the rounds, ``spread`` (max - min) / median,
``ratio_vs_baseline`` the median over the baseline's median. Each row carries a ``key``
(``stage.name``) that code reading the JSON relies on. :func:`run_stages` runs a profile's stages in
order (:mod:`tools.bench.profiles`), recording a failing stage and going on with the others.
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
import torchvision

from data.synthetic import make_jpeg_folder
from models.io import atomic_save, write_json

log = logging.getLogger("simreg.benchmark")


@dataclass
class Context:
    """What the stages share: the device, the folders, what earlier stages built, the rows so far."""

    device: torch.device
    work_dir: str  # where generated files (JPEGs, cache arrays, runs) are kept for the next run
    compile_backend: str
    train_dir: str = ""  # generated JPEGs (ImageFolder layout), for the profiles that read images
    json_path: str | None = None  # where the rows go (the main job writes its log beside them)
    inputs: list = field(default_factory=list)  # rows read from earlier runs (the hours profile)
    ours: dict = field(default_factory=dict)  # our step configurations, built once
    original: object | None = None  # the original recipe's step, built once
    shared: dict = field(default_factory=dict)  # what one stage leaves for the next (a cache file, the job)
    rows: list = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so host clocks time finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """``(work(), wall seconds, this process's CPU seconds)``, the device synchronised before and after.

    CPU seconds leave out the time other jobs held the cores (and the loader workers' time), so on a
    shared CPU they are the steadier figure of in-process work; on a GPU only the wall time means much.
    """
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = work()
    synchronize(device)
    return out, time.perf_counter() - start, time.process_time() - cpu_start


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


def measure(
    stage: str, variants: list[Variant], rounds: int, device: torch.device, unit: str, cpu_time: bool = False
) -> list[dict]:
    """Warm every variant up once, then time them in turn for ``rounds`` rounds; one row per variant.

    ``cpu_time``: the rows also give the rate per CPU-second of this process (``img_per_cpu_s``, its
    ratio and spread), for stages whose work runs in this process.
    """
    live = [v for v in variants if v.run is not None]
    for v in live:
        if v.role != "repeat":  # the repeat shares the baseline's runner
            log.info("%s: warming up %s", stage, v.name)
            v.run()
    wall: dict[str, list[float]] = {v.name: [] for v in live}
    cpu: dict[str, list[float]] = {v.name: [] for v in live}
    for r in range(rounds):
        for v in live:
            n, seconds, cpu_seconds = timed(v.run, device)
            wall[v.name].append(n / seconds)
            cpu[v.name].append(n / max(cpu_seconds, 1e-9))
        log.info("%s: round %d/%d done", stage, r + 1, rounds)
    baseline = next(v.name for v in live if v.role == "baseline")
    rows = []
    for v in variants:
        row = {"stage": stage, "config": v.name, "role": v.role, "unit": unit, "note": v.note}
        row["key"] = f"{stage}.{v.key or v.role}"
        if v.run is None:
            rows.append({**row, "img_s": None, "ratio_vs_baseline": None, "spread": None, "skipped": True})
            continue
        med, ratio, spread = _summary(wall[v.name], wall[baseline], v.role)
        rows.append({**row, "img_s": med, "ratio_vs_baseline": ratio, "spread": spread, "rounds": wall[v.name]})
        if cpu_time:
            med, ratio, spread = _summary(cpu[v.name], cpu[baseline], v.role)
            rows[-1].update(img_per_cpu_s=med, cpu_ratio_vs_baseline=ratio, cpu_spread=spread)
    return rows


def _summary(rates: list[float], baseline: list[float], role: str) -> tuple[float, float | None, float]:
    """(median rate, its ratio to the baseline's median or None, (max - min) / median)."""
    med = statistics.median(rates)
    ratio = None if role in NO_RATIO else med / statistics.median(baseline)
    return med, ratio, (max(rates) - min(rates)) / med


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


def random_teacher_file(work_dir: str, arch: str) -> str:
    """A randomly initialised torchvision ``arch`` saved in its public layout (kept for the next run)."""
    path = os.path.join(work_dir, f"teacher_{arch}_random.pth")
    if not os.path.isfile(path):
        torch.manual_seed(0)
        atomic_save(getattr(torchvision.models, arch)().state_dict(), path)
    return path


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


def run_stages(stages: dict[str, Callable], p, ctx: Context, meta: dict) -> list:
    """Run ``stages`` (``stage(p, ctx) -> rows``) in order; a failing stage is recorded and the others still run.

    Every row gets the stage's wall seconds (``stage_s``) and ``meta``. ``ctx.json_path`` is rewritten after
    each stage, so a run cut short (a time limit) keeps what it finished.
    """
    rows: list[dict] = []
    for name, stage in stages.items():
        log.info("stage %s", name)
        start = time.perf_counter()
        try:
            stage_rows = stage(p, ctx)
        except Exception as exc:  # one broken stage must not cost a device session the others
            log.exception("stage %s failed", name)
            note = f"failed: {type(exc).__name__}: {exc}"[:300]
            stage_rows = [{"stage": name, "config": "stage failed", "role": "baseline", "note": note, "img_s": None}]
            stage_rows[0].update(key=f"{name}.failed", ratio_vs_baseline=None, spread=None, skipped=True, failed=True)
        seconds = round(time.perf_counter() - start, 1)
        stage_rows = [{"stage": name, **r, "stage_s": seconds} for r in stage_rows]
        ctx.rows += stage_rows
        rows += [{**r, **meta} for r in stage_rows]
        if ctx.json_path:
            write_json(ctx.json_path, rows)
    return rows


def failed_stages(rows: list[dict]) -> list[str]:
    """The stages that raised, or whose row says it did not come out right (``ok`` false)."""
    return list(dict.fromkeys(r["stage"] for r in rows if r.get("failed") or r.get("ok") is False))


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
    if "bytes_per_row" in r:
        sizes = ", ".join(f"{d}-d {b:.0f} B/row = {r['imagenet_gib_per_view'][d]:.2f} GiB per ImageNet view"
                          for d, b in r["bytes_per_row"].items())  # fmt: skip
        return f"{r['seconds_per_view']:.1f} s per view; {sizes}"
    if "top1_majority" in r:
        same = r["same_neighbours_rows_pct"]
        return f"top-1 {r['top1_majority']:.2f} (majority), {r['top1_weighted']:.2f} (weighted); same k-NN {same:.1f}%"
    if "img_per_cpu_s" in r and r["cpu_ratio_vs_baseline"] is not None:
        return f"per CPU-second {r['img_per_cpu_s']:.2f}/s, ratio {r['cpu_ratio_vs_baseline']:.2f}"
    return r["note"]


def format_table(rows: list[dict], info: dict) -> str:
    """The summary of timing rows: one line per row, rates as medians over the rounds."""
    w = max([7, *(len(r["stage"]) for r in rows)])
    lines = [f"\n{info['device']} | {info['cpu_cores']} CPU cores | torch {info['torch']} | {info['date']}",
             f"{'stage':<{w}} {'config':<66} {'rate/s':>10} {'ratio':>6} {'spread':>7}"]  # fmt: skip
    for r in rows:
        name = r["config"][:66]
        if r["img_s"] is None:
            lines.append(f"{r['stage']:<{w}} {name:<66} {'-':>10} {'-':>6} {'-':>7}  {row_remark(r)}")
            continue
        ratio = "-" if r["ratio_vs_baseline"] is None else f"{r['ratio_vs_baseline']:.2f}"
        rate, spread = f"{r['img_s']:.1f}", "-" if r["spread"] is None else f"{r['spread']:.1%}"
        lines.append(f"{r['stage']:<{w}} {name:<66} {rate:>10} {ratio:>6} {spread:>7}  {row_remark(r)}")
    return "\n".join(lines) + "\n"
