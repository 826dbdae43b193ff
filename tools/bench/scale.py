"""The data_scale profile: what the sample index costs as a dataset grows to 14 million images.

Simulated datasets of N files in ImageNet-like class folders (``n00000000/n00000000_17.JPEG``, ``per_folder``
files each) are hard links to a few real JPEGs (ext4 allows 65,000 links per file, so 256 sources serve
16 million links; a link costs a directory entry, no data and no inode). The same samples as shards:
one real shard of ``shard_size`` of those JPEGs, hard-linked once per shard, each link with its own index
naming the folder's files (so both forms have one fingerprint); every read is a real read of the tar.

Each measurement runs in a fresh process (``probe``), for the folder with our index (numpy arrays), the
folder with the list of ``(path, label)`` tuples this project built before (the baseline: its scan, its
fingerprint, its sampler, as they were), and the shards with ours:

- ``first_batch_s``: from the start of the dataset's construction to the first training batch of a
  ``workers``-process loader (scan, fingerprint, training views, sampler, worker start, decoding);
- ``build_s``, ``fingerprint_s``: the scan (or reading the shard indexes) and one dataset fingerprint;
- ``main_index_mb``: the main process's resident memory after the first batch, beyond what it held before
  the dataset was built (index, sampler, loader);
- ``worker_private_mb``: each of ``workers`` processes forked from that main process reads the sample
  entries of its share of one shuffled epoch (the batches a loader worker gets: every ``workers``-th),
  as ``__getitem__`` reads them, without decoding; the growth of its private memory (Private_Clean +
  Private_Dirty of ``/proc/self/smaps_rollup``) during that pass is what the index cost it. When the
  baseline's copies would not fit in half the free memory, its workers run a few at a time (each one's
  figure is its own either way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from data.datasets import IMG_EXTENSIONS, IndexedImages, dataset_fingerprint, load_rgb
from data.index import SampleIndex
from data.loaders import EpochSampler, build_loader
from data.shards import index_shard, shard_name, shard_spec, write_index, write_shard
from data.sources import open_images
from data.synthetic import make_jpeg_folder
from data.transforms import training_views
from models.errors import UserError
from tools.bench.harness import Context

log = logging.getLogger("simreg.benchmark")
MAX_LINKS = 65_000  # ext4's hard links per file


# ============ the baseline: the list-of-tuples index as this project built it before ============
def tuple_index_scan(root: str, classes=None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to root, label)]): the previous ``scan_image_folder``, unchanged."""
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    classes = list(classes) if classes is not None else found
    samples = []
    for label, cls in enumerate(classes):
        files = []
        for dirpath, _, names in os.walk(os.path.join(root, cls), followlinks=True):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        samples += [(os.path.relpath(p, root), label) for p in sorted(files)]
    return classes, samples


class TupleFolder:
    """The previous IndexedImageFolder: its samples a Python list of tuples, read the way it read them."""

    def __init__(self, root: str, seed: int = 0) -> None:
        self.root, self.seed, self.transform = root, seed, None
        self.classes, self.samples = tuple_index_scan(root)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> dict:
        rel = "\n".join(path.replace(os.sep, "/") for path, _ in self.samples)
        return {"n_images": len(self.samples), "classes": list(self.classes),
                "paths_sha256": hashlib.sha256(rel.encode()).hexdigest()}  # fmt: skip

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rel, label = self.samples[index]
        img = (getattr(self.transform, "loader", None) or load_rgb)(os.path.join(self.root, rel))
        return self.transform(img, random.Random(f"{self.seed}/{epoch}/{index}")), label, index


class ListSampler(EpochSampler):
    """The previous sampler: the epoch's order as Python lists, one ``(index, epoch)`` tuple per sample."""

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.world_size
        order += (order * (total // max(len(order), 1) + 1))[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start :]])


def touch_tuples(dataset: TupleFolder, i: int) -> None:
    """What the previous ``__getitem__`` read of the index for sample ``i``."""
    rel, label = dataset.samples[i]
    os.path.join(dataset.root, rel)


def touch_ours(dataset: IndexedImages, i: int) -> None:
    """What ``IndexedImages.__getitem__`` reads of the index for sample ``i`` (name, label, shard location)."""
    dataset.index.label(i)
    files = dataset.files
    if hasattr(files, "offsets"):
        files.shard_of(i), int(files.offsets[i]), int(files.sizes[i]), files.index.name(i)
    else:
        os.path.join(files.root, files.index.name(i))


# ============ one measurement, in a fresh process ============
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field))


def private_bytes() -> int:
    """This process's private memory (Private_Clean + Private_Dirty of /proc/self/smaps_rollup: its USS)."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("Private_Clean", "Private_Dirty")))


def probe(spec: dict) -> dict:
    """Build the dataset ``spec`` names the way ``train_student.py`` does, time it to the first batch, then
    fork the workers' index pass; prints and returns the figures (``spec``: data, impl, workers, batch, size)."""
    torch.set_num_threads(1)
    rss_before = _status_kb("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    if spec["impl"] == "tuples":
        dataset, touch = TupleFolder(os.path.join(spec["data"], "train")), touch_tuples
        built, built_cpu = time.perf_counter(), time.process_time()
        fingerprint = dataset.fingerprint()
        names = [path for path, _ in dataset.samples]  # as the previous train_student.py listed them for --decode
    else:
        dataset, touch = open_images(spec["data"]), touch_ours
        built, built_cpu = time.perf_counter(), time.process_time()
        fingerprint = dataset_fingerprint(dataset)
        names = dataset.index.name_sample()
    fingerprinted = time.perf_counter()
    dataset.transform = training_views(spec["size"], True, True, False, "auto", torch.device("cpu"), names)
    del names
    if spec["impl"] == "tuples":
        loader = torch.utils.data.DataLoader(dataset, spec["batch"], sampler=ListSampler(len(dataset)),
                                             num_workers=spec["workers"], drop_last=True,
                                             persistent_workers=True, prefetch_factor=4)  # fmt: skip
    else:
        loader = build_loader(dataset, spec["batch"], num_workers=spec["workers"], seed=0)
    loader.sampler.set_epoch(1)
    batches = iter(loader)  # the sampler's epoch order made, the workers started, no batch received yet
    main_mb = (_status_kb("VmRSS") - rss_before) / 1024
    next(batches)
    first = time.perf_counter()
    out = {
        "n_images": fingerprint["n_images"],
        "build_s": built - start,
        "fingerprint_s": fingerprinted - built,
        "first_batch_s": first - start,
        "main_index_mb": main_mb,
        "main_rss_mb": _status_kb("VmRSS") / 1024,
        "build_cpu_s": built_cpu - start_cpu,
    }
    del batches, loader
    out["workers"] = worker_pass(dataset, touch, spec["workers"], spec["batch"], main_mb)
    print("PROBE " + json.dumps(out), flush=True)
    return out


def worker_pass(dataset, touch, workers: int, batch: int, main_mb: float) -> list[dict]:
    """Fork ``workers`` processes that each read the index entries of their share of epoch 1; their
    private memory before and after (MiB), and the seconds the pass took."""
    order = EpochSampler(len(dataset), seed=0).order() if workers else np.zeros(0, np.int64)
    available_mb = _meminfo_kb("MemAvailable") / 1024
    at_once = max(1, min(workers, int(0.5 * available_mb / max(main_mb, 1.0))))
    results = []
    for first in range(0, workers, at_once):
        children = [_fork_worker(dataset, touch, order, w, workers, batch) for w in range(first, first + at_once)]
        results += [_collect(*child) for child in children if child]
    return results


def _fork_worker(dataset, touch, order: np.ndarray, w: int, workers: int, batch: int):
    if w >= workers:
        return None
    r, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before, started = private_bytes(), time.perf_counter()
        for b in range(w, -(-len(order) // batch), workers):  # the batches a loader gives worker w
            for i in order[b * batch : (b + 1) * batch]:
                touch(dataset, int(i))
        report = {"private_before_mb": before / 2**20, "private_after_mb": private_bytes() / 2**20}
        report["pass_s"] = time.perf_counter() - started
        os.write(wr, json.dumps(report).encode())
        os._exit(0)
    os.close(wr)
    return pid, r


def _collect(pid: int, r: int) -> dict:
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field))


def run_probe(spec: dict, timeout: float) -> dict:
    """:func:`probe` in a fresh Python process (its memory figures start from a clean slate)."""
    code = f"from tools.bench.scale import probe; probe({spec!r})"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"probe {spec['impl']} of {spec['data']} failed: {done.stderr.strip()[-500:]}")
    return json.loads(line[6:])


# ============ the simulated datasets ============
def class_name(c: int) -> str:
    return f"n{c:08d}"


def file_name(i: int, per_folder: int) -> str:
    """Sample ``i``'s relative path in the simulated folder (the dataset's order is ``i``'s)."""
    c = class_name(i // per_folder)
    return f"{c}/{c}_{i % per_folder}.JPEG"


def check_room(work: str, n: int, folders: int, shard_bytes: int) -> None:
    """Enough free bytes (directory entries, indexes, the real shard) and inodes (folders, links are free)."""
    stat = os.statvfs(os.path.dirname(os.path.abspath(work)) if not os.path.isdir(work) else work)
    need = n * 200 + shard_bytes + 2**30
    if stat.f_bavail * stat.f_frsize < need or stat.f_favail < folders + 10_000:
        raise UserError(
            f"simulating {n:,} files needs about {need / 2**30:.1f} GiB and {folders + 10_000:,} inodes free under "
            f"'{work}'; free some or choose --work_dir elsewhere"
        )


def make_folder(work: str, n: int, per_folder: int, sources: list[str]) -> str:
    """``work/files_N/train/<class>/<file>``: N hard links to ``sources`` (reused when complete)."""
    root = os.path.join(work, f"files_{n}")
    stamp = os.path.join(root, "complete.json")
    if os.path.isfile(stamp):
        return root
    check_room(work, n, n // per_folder + 1, 0)
    started = time.perf_counter()
    for c in range(-(-n // per_folder)):
        folder = os.path.join(root, "train", class_name(c))
        os.makedirs(folder, exist_ok=True)
        for j in range(per_folder * c, min(n, per_folder * (c + 1))):
            try:
                os.link(sources[j % len(sources)], os.path.join(root, "train", file_name(j, per_folder)))
            except FileExistsError:  # an earlier, interrupted run made it
                pass
    with open(stamp, "w") as f:
        json.dump({"n": n, "per_folder": per_folder}, f)
    log.info("simulated folder of %d files under %s in %.0f s", n, root, time.perf_counter() - started)
    return root


def real_shard(work: str, shard_size: int, sources: list[str]) -> str:
    """One real shard of ``shard_size`` source JPEGs (cycled), written by ``write_shard``."""
    path = os.path.join(work, f"real_{shard_size}.tar")
    if not os.path.isfile(path):
        index = SampleIndex.from_names([f"real/{i}.JPEG" for i in range(shard_size)])

        def read(i: int) -> bytes:
            with open(sources[i % len(sources)], "rb") as f:
                return f.read()

        write_shard(path, read, index, 0, shard_size)
    return path


def make_shards(work: str, n: int, per_folder: int, shard_size: int, sources: list[str]) -> str:
    """``work/shards_N/train-NNNNNN.tar``: hard links to one real shard, each indexed as the folder's files."""
    folder = os.path.join(work, f"shards_{n}")
    n_shards = -(-n // shard_size)
    spec = shard_spec(folder, "train", n_shards)
    stamp = os.path.join(folder, "complete.json")
    if os.path.isfile(stamp):
        return spec
    real = real_shard(work, shard_size, sources)
    arrays = index_shard(real)
    classes = [class_name(c) for c in range(-(-n // per_folder))]
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        path = shard_name(folder, "train", s)
        if not os.path.exists(path):
            os.link(real, path)  # a shard is about a GB: one real file, linked
        names = [file_name(i, per_folder) for i in range(lo, hi)]
        index = SampleIndex.from_names(names, np.arange(lo, hi) // per_folder, classes)
        mine = {**arrays, "names": index.blob, "starts": index.starts.astype(np.int64), "labels": index.labels}
        mine.update(classes=np.frombuffer(json.dumps(classes).encode(), np.uint8))
        mine.update(offsets=arrays["offsets"][: hi - lo], sizes=arrays["sizes"][: hi - lo])
        write_index(path, mine)
    with open(stamp, "w") as f:
        json.dump({"n": n, "shard_size": shard_size}, f)
    return spec


# ============ the stage ============
def stage_scale(p, ctx: Context) -> list[dict]:
    """For each N: the folder with the baseline's index and ours, then the shards with ours; one row each."""
    sizes = [int(v) for v in str(p.files).split(",") if v.strip()]
    work = os.path.join(ctx.work_dir, "scale")
    made = make_jpeg_folder(os.path.join(work, "sources"), p.sources, n_classes=1, size=p.jpeg_size)
    sources = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(work, "sources", "train")) for f in fs)
    if max(sizes) > MAX_LINKS * len(sources):
        need = math.ceil(max(sizes) / MAX_LINKS)
        raise UserError(f"{max(sizes):,} files need at least {need} source JPEGs; --set sources={need}")
    rows = []
    for n in sizes:
        forms = [("folder", "tuples"), ("folder", "ours"), ("shards", "ours")]
        for form, impl in forms:
            if form == "folder":
                data = make_folder(work, n, p.per_folder, sources)
            else:
                check_room(work, n, 10, 2 * p.shard_size * int(made["mean_kb"] * 1000))
                data = make_shards(work, n, p.per_folder, p.shard_size, sources)
            load = os.getloadavg()
            spec = {"data": data, "impl": impl, "workers": p.workers, "batch": p.batch, "size": p.image_size}
            log.info("data_scale: %s of %d files, %s index (load %.2f)", form, n, impl, load[0])
            figures = run_probe(spec, timeout=p.timeout)
            rows.append(scale_row(n, form, impl, figures, load))
        if not p.keep:
            for path in (os.path.join(work, f"files_{n}"), os.path.join(work, f"shards_{n}")):
                shutil.rmtree(path, ignore_errors=True)
    if not p.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def scale_row(n: int, form: str, impl: str, figures: dict, load: tuple) -> dict:
    """One row: the probe's figures with the workers' private memory summarised (MiB)."""
    workers = figures.pop("workers")
    grown = [w["private_after_mb"] - w["private_before_mb"] for w in workers]
    index = "list of (path, label) tuples (before)" if impl == "tuples" else "numpy arrays"
    row = {"stage": "index", "config": f"{form}, {index}", "role": "baseline" if impl == "tuples" else "variant"}
    row.update(key=f"index.{form}_{impl}_{n}", n_files=n, form=form, index=index, note="", img_s=None)
    row.update({k: round(v, 3) for k, v in figures.items()})
    row.update(worker_private_mb=round(max(grown), 1) if grown else None,
               worker_private_median_mb=round(float(np.median(grown)), 1) if grown else None,
               worker_uss_mb=round(max(w["private_after_mb"] for w in workers), 1) if workers else None,
               worker_pass_s=round(max(w["pass_s"] for w in workers), 1) if workers else None,
               workers=len(workers), load_1min=round(load[0], 2), load_5min=round(load[1], 2))  # fmt: skip
    return row


def format_scale_table(rows: list[dict], p, ctx: Context) -> str:
    """How each figure grows with N, our index beside the baseline's."""
    head = rows[0] if rows else {}
    lines = [
        f"\n{head.get('device', '')} | {head.get('cpu_cores', '')} cores | load: 1-minute average at each row's start",
        f"{'files':>11} {'form, index':<46} {'first batch s':>13} {'build s (cpu)':>14} {'fingerprint s':>13} "
        f"{'main MiB':>8} {'worker MiB':>10} {'load':>5}",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"{'':>11} {r['note'][:100]}")
            continue
        build = f"{r['build_s']:.1f} ({r['build_cpu_s']:.1f})"
        lines.append(f"{r['n_files']:>11,} {r['config']:<46} {r['first_batch_s']:>13.1f} {build:>14} "
                     f"{r['fingerprint_s']:>13.2f} {r['main_index_mb']:>8.0f} {r['worker_private_mb']:>10.1f} "
                     f"{r['load_1min']:>5.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def check_scale(p, ctx: Context) -> None:
    """Linux (the memory figures read /proc), sizes that parse, a shard no larger than the smallest N."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        raise UserError("the data_scale profile reads /proc/self/smaps_rollup: run it on Linux")
    try:
        sizes = [int(v) for v in str(p.files).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--set files={p.files}: give file counts separated by commas, e.g. 100000,1281167") from None
    if not sizes or min(sizes) < p.batch:
        raise UserError(f"--set files={p.files}: every count must be at least one batch ({p.batch})")
