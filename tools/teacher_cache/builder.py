"""Building a teacher feature cache (the reader is :mod:`tools.teacher_cache.reader`).

:func:`build_cache` runs the teacher once over every row of the cache (all ranks of a torchrun job
share the work) and rank 0 writes the rows in the file's order. A centre-crop cache has one row per
training image, (N, D); a K-view cache one per image and view, (K, N, D), row [v - 1, i] computed on
the crop the training loader gives image i in epoch v. The work is ordered image by image (the K views
of an image follow each other, so its file is read once from disk and then from the page cache) and cut
into batches of rows: one teacher forward per stored row, nothing recomputed, whatever the views.

It is resumable: rows go into ``FILE.npy.partial`` with a done-mask ``FILE.npy.done.npy`` (in work
order) saved after every flush, so a rerun computes only the missing rows; the final file appears by an
atomic rename, then the manifest. Only rank 0 touches these files, so no shared filesystem between
nodes is needed.

With dense targets (``--dense``) the same forward also gives the teacher's feature map, stored row by
row in ``FILE.dense.npy`` (float16, the map resampled to the stored grid exactly as the training loss
resamples it: :class:`DenseSpec`); its partial file shares the done-mask.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import dataset_fingerprint
from data.loaders import ignore_stop_signals
from data.prefetch import DevicePrefetcher
from models.errors import UserError
from models.io import atomic_npy, read_json, write_json
from models.simreg import resample_grid
from tools.engine.distributed import DistInfo
from tools.engine.step import autocast, channels_last_default
from tools.teacher_cache.reader import (
    CENTRE_CROP,
    MANIFEST_VERSION,
    autocast_name,
    dense_path,
    manifest_path,
    read_manifest,
)

log = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0  # at most this much work is lost when a build is interrupted
BUILD_KEYS = ("teacher", "preprocessing", "views", "n_images", "paths_sha256", "classes", "shape", "dense")


def _partial_paths(npy_path: str) -> tuple[str, str, str]:
    return npy_path + ".partial", npy_path + ".done.npy", npy_path + ".partial.json"


@dataclass(frozen=True)
class DenseSpec:
    """Dense targets stored beside the pooled ones: the teacher's map (C, H, W) resampled to ``grid`` (h, w).

    Rows of ``FILE.dense.npy`` are float16 (h * w * C,), location by location with the channels last.
    """

    blocks: int
    channels: int
    teacher_grid: tuple[int, int]
    grid: tuple[int, int]
    source: str

    @property
    def row_width(self) -> int:
        return self.grid[0] * self.grid[1] * self.channels

    def record(self, npy_path: str) -> dict:
        """The manifest's ``dense`` section."""
        return {"file": os.path.basename(dense_path(npy_path)), "channels": self.channels, "grid": list(self.grid),
                "teacher_grid": list(self.teacher_grid), "blocks": self.blocks, "source": self.source,
                "dtype": "float16", "layout": "row = (h, w, C): locations row by row, channels last",
                "bytes_per_row": 2 * self.row_width}  # fmt: skip


def _gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank (rank-major); identity in one process."""
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _broadcast_pending(done: np.ndarray | None, n: int, device: torch.device, world_size: int) -> np.ndarray:
    """Rank 0's done-mask sent to every rank; returns the sorted work positions still to compute."""
    mask = torch.from_numpy(done.astype(np.uint8)) if done is not None else torch.zeros(n, dtype=torch.uint8)
    if world_size > 1:
        mask = mask.to(device)
        dist.broadcast(mask, src=0)
    return np.flatnonzero(mask.cpu().numpy() == 0)


def plan_rank(pending: np.ndarray, rank: int, world_size: int, batch: int) -> list[np.ndarray]:
    """This rank's work positions, step by step; every rank gets the same number of steps.

    Step s covers ``pending[s*W*B : (s+1)*W*B]``, rank r its r-th block of up to B. Nothing is padded
    (no row is computed twice): in the last step a rank may get fewer rows than B, or none.
    """
    per_step = world_size * batch
    steps = -(-len(pending) // per_step)
    return [pending[s * per_step + rank * batch : s * per_step + (rank + 1) * batch] for s in range(steps)]


class WorkOrder:
    """Work position p <-> image ``p // K``, view ``p % K + 1`` <-> file row ``(p % K) * N + p // K``."""

    def __init__(self, n_images: int, n_views: int) -> None:
        self.n, self.k = n_images, max(n_views, 1)

    def keys(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """Dataset keys ``(index, epoch)``: view v of image i is its crop in epoch v."""
        return [(int(p) // self.k, int(p) % self.k + 1) for p in positions]

    def file_rows(self, positions: np.ndarray) -> np.ndarray:
        return (positions % self.k) * self.n + positions // self.k


class _Batches:
    """The loader's batch sampler: this rank's non-empty steps as lists of dataset keys."""

    def __init__(self, steps: list[np.ndarray], order: WorkOrder) -> None:
        self.steps, self.order = [s for s in steps if len(s)], order

    def __iter__(self):
        return (self.order.keys(s) for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def _prepare(npy_path: str, shapes: list[tuple[int, ...]], build_info: dict, overwrite: bool) -> np.ndarray | None:
    """Rank 0: create or resume the partial file(s) (pooled targets, then dense ones); returns the done-mask
    (None when already complete)."""
    data, done_path, info_path = _partial_paths(npy_path)
    partials = [data] + [dense_path(npy_path) + ".partial"] * (len(shapes) > 1)
    if os.path.exists(npy_path) and os.path.exists(manifest_path(npy_path)) and not overwrite:
        old = read_manifest(npy_path)
        if {k: old.get(k) for k in build_info} == build_info:
            log.info("teacher cache %s is already complete for these settings; nothing to do", npy_path)
            return None
        raise UserError(
            f"'{npy_path}' already holds a teacher cache built with other settings; delete it, choose another "
            "--out, or pass --overwrite"
        )
    if all(os.path.exists(p) for p in (*partials, done_path, info_path)):
        if read_json(info_path) == build_info:
            done = np.load(done_path)
            log.info("resuming %s: %d of %d rows already done", data, int(done.sum()), len(done))
            return done
        log.warning("discarding %s: it was started with other settings", data)
    for path, shape in zip(partials, shapes, strict=True):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
    done = np.zeros(int(np.prod(shapes[0][:-1])), dtype=bool)
    atomic_npy(done_path, done)
    write_json(info_path, build_info)
    return done


def _finish(npy_path: str, manifest: dict) -> None:
    data, done_path, info_path = _partial_paths(npy_path)
    if "dense" in manifest:  # before the pooled file: a cache is complete once its manifest is written
        os.replace(dense_path(npy_path) + ".partial", dense_path(npy_path))
    os.replace(data, npy_path)  # atomic: the cache appears complete or not at all
    write_json(manifest_path(npy_path), manifest)
    for p in (done_path, info_path):
        os.remove(p)
    files = [f"{npy_path} {tuple(manifest['shape'])}"]
    files += [f"{dense_path(npy_path)} {tuple(manifest['dense']['shape'])}"] if "dense" in manifest else []
    log.info("teacher cache written: %s float16 and %s (%d rows in %.1f s)", " and ".join(files),
             manifest_path(npy_path), manifest["rows_built"], manifest["build_seconds"])  # fmt: skip


def _teacher_rows(teacher, x: torch.Tensor, dense: DenseSpec | None) -> list[torch.Tensor]:
    """float16 rows of a batch: the pooled features (B, D), and with ``dense`` the maps at the stored grid,
    (B, h * w * C) channels last."""
    if dense is None:
        return [teacher(x).to(torch.float16)]
    out = teacher.targets(x, None)  # one forward: {"global": (B, D), "dense": (B, C, H, W)}
    fmap = resample_grid(out["dense"].float(), dense.grid)  # (B, C, h, w), as the training loss resamples
    return [out["global"].to(torch.float16), fmap.permute(0, 2, 3, 1).flatten(1).to(torch.float16)]


def _extract(
    teacher,
    loader,
    steps: list[np.ndarray],
    batch: int,
    writer,
    dist_info: DistInfo,
    amp: torch.dtype | None,
    desc: str,
    dense: DenseSpec | None = None,
) -> None:
    """Run the teacher over this rank's steps; rank 0 gathers every rank's rows and hands them to ``writer``.

    The teacher runs as a live teacher runs in training: under ``amp`` autocast (bf16 on CUDA by
    default), so the cached rows are the targets a live teacher would give, up to float16 storage. Batches
    are made ready one ahead by :class:`data.prefetch.DevicePrefetcher` (``--decode gpu``: decoded there,
    as training does). With several ranks each step's features are padded to ``batch`` rows (position
    -1) for the gather; the padding is zeros, never a teacher forward.
    """
    device, world_size = dist_info.device, dist_info.world_size
    channels_last = channels_last_default(None, device, amp)
    widths = [int(teacher.feat_dim)] + ([dense.row_width] if dense else [])
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    batches = iter(DevicePrefetcher(loader, device))
    try:
        for rows in tqdm(steps, desc=desc, disable=None if dist_info.is_main else True, dynamic_ncols=True):
            width = batch if world_size > 1 else len(rows)
            feats = [torch.zeros(width, w, dtype=torch.float16, device=device) for w in widths]  # (B, D), (B, hwC)
            position = torch.full((width,), -1, dtype=torch.int64, device=device)
            if len(rows):
                images, _, _ = next(batches)
                x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
                with torch.inference_mode(), autocast(device, amp):
                    for f, got in zip(feats, _teacher_rows(teacher, x.float().div_(255.0), dense), strict=True):
                        f[: len(rows)] = got
                position[: len(rows)] = torch.from_numpy(rows).to(device, non_blocking=True)
            feats, position = [_gather(f, world_size) for f in feats], _gather(position, world_size)
            if dist_info.is_main:
                keep = position >= 0
                writer(position[keep].cpu().numpy(), *(f[keep].cpu().numpy() for f in feats))
    finally:
        batches.close()


def _agree_to_start(npy_path: str, shapes, build_info: dict, overwrite: bool, dist_info: DistInfo):
    """Rank 0 prepares the partial file(s); every rank learns whether to build (done-mask), stop or fail."""
    done, failure = None, None
    if dist_info.is_main:
        try:
            done = _prepare(npy_path, shapes, build_info, overwrite)
        except UserError as exc:  # tell the other ranks before raising, or they would wait forever
            failure = exc
    code = 2 if failure else int(dist_info.is_main and done is None)
    status = torch.tensor([code], dtype=torch.uint8, device=dist_info.device)
    if dist_info.distributed:
        dist.broadcast(status, src=0)
    if failure is not None or status.item() == 2:
        raise failure or UserError(f"rank 0 could not prepare the teacher cache '{npy_path}' (see its message)")
    return done, status.item() == 1


def cache_shape(n_images: int, feat_dim: int, n_views: int = 0) -> tuple[int, ...]:
    """(N, D) for a centre-crop cache (``n_views`` 0), (K, N, D) for K views."""
    return (n_images, feat_dim) if n_views == 0 else (n_views, n_images, feat_dim)


def _complete_manifest(
    manifest: dict, dataset, shapes: list, n_views: int, amp: torch.dtype | None, dense: DenseSpec | None, npy_path: str
) -> dict:
    """The manifest as written: the caller's description, the views, the autocast, fingerprint and shape (and
    with dense targets their section)."""
    views = {**manifest.get("views", CENTRE_CROP), "n_views": max(n_views, 1)}
    if (views["mode"] == CENTRE_CROP["mode"]) != (n_views == 0):
        raise ValueError(f"a cache of {n_views} views cannot be described as {views['mode']}")
    preprocessing = {**manifest.get("preprocessing", {}), "autocast": autocast_name(amp)}
    manifest = {"version": MANIFEST_VERSION, **manifest, "preprocessing": preprocessing, "views": views}
    manifest = {**manifest, **dataset_fingerprint(dataset), "shape": list(shapes[0])}
    if dense is not None:
        manifest["dense"] = {**dense.record(npy_path), "shape": list(shapes[1])}
    return manifest


def build_cache(
    teacher: torch.nn.Module,
    dataset,
    npy_path: str,
    manifest: dict,
    *,
    batch_size: int,
    num_workers: int,
    dist_info: DistInfo,
    overwrite: bool = False,
    n_views: int = 0,
    amp: torch.dtype | None = None,
    desc: str = "teacher features",
    dense: DenseSpec | None = None,
) -> None:
    """Write ``teacher``'s features of every row to ``npy_path``: one forward per row, in batches of rows.

    ``dataset`` gives the crops: uint8 centre crops (``n_views`` 0, key = index) or, for K views, the
    training transform reduced to the teacher's view (``data.transforms.TeacherView``), whose key
    ``(index, v)`` gives view v. ``manifest`` describes the teacher, preprocessing and views (a
    centre-crop cache gets ``CENTRE_CROP``); the dataset fingerprint and shape are added here. ``amp``: the
    autocast dtype the teacher runs under (None: float32), recorded in the manifest's preprocessing. All
    ranks call this with the same arguments; rows land in file order whatever the split. ``desc`` labels the
    progress bar. Ctrl-C keeps the rows computed so far: rerunning the same command resumes. ``dense``: each
    row's dense targets too, in ``FILE.dense.npy`` (the teacher set to ``use_objective("both")``)."""
    n, device, world_size = len(dataset), dist_info.device, dist_info.world_size
    shapes = [cache_shape(n, w, n_views) for w in (int(teacher.feat_dim), *([dense.row_width] if dense else []))]
    manifest = _complete_manifest(manifest, dataset, shapes, n_views, amp, dense, npy_path)
    build_info = {k: manifest[k] for k in BUILD_KEYS if k in manifest}  # dense: only in dense builds
    done, finished = _agree_to_start(npy_path, shapes, build_info, overwrite, dist_info)
    if finished:
        return
    order = WorkOrder(n, n_views)
    pending = _broadcast_pending(done, n * order.k, device, world_size)
    steps = plan_rank(pending, dist_info.rank, world_size, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=_Batches(steps, order),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset.transform, "collate", None),
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
    writer = _RowWriter(npy_path, done, order, dense is not None) if dist_info.is_main else None
    teacher.eval()
    started = time.monotonic()
    try:
        _extract(teacher, loader, steps, batch_size, writer, dist_info, amp, desc, dense)
    except KeyboardInterrupt:
        if writer is not None:
            writer.flush()  # the rows done so far are kept; the same command resumes from them
        raise
    if dist_info.is_main:
        writer.close()
        seconds = time.monotonic() - started
        stamp = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": world_size}
        _finish(npy_path, {**manifest, **stamp, "build_seconds": round(seconds, 3), "rows_built": len(pending)})


class _RowWriter:
    """Rank 0's writer: rows into the memory-mapped partial file(s) (pooled, and dense when built), the
    done-mask saved after each flush."""

    def __init__(self, npy_path: str, done: np.ndarray, order: WorkOrder, dense: bool = False) -> None:
        data, self.done_path, _ = _partial_paths(npy_path)
        paths = [data] + [dense_path(npy_path) + ".partial"] * dense
        self.files = [np.load(p, mmap_mode="r+") for p in paths]
        self.rows = [f.reshape(-1, f.shape[-1]) for f in self.files]  # (K * N, width), views of the mapped files
        self.done, self.order, self.last_flush = done, order, time.monotonic()

    def __call__(self, position: np.ndarray, *feats: np.ndarray) -> None:
        keep = ~self.done[position]  # never write a row twice
        position = position[keep]
        for rows, f in zip(self.rows, feats, strict=True):
            rows[self.order.file_rows(position)] = f[keep]
        self.done[position] = True
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for f in self.files:
            f.flush()  # rows reach the file before the mask says they are done
        atomic_npy(self.done_path, self.done)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if not self.done.all():
            raise RuntimeError(f"teacher cache build ended with {int((~self.done).sum())} rows missing")
        del self.rows, self.files
