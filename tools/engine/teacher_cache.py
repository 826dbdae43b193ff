"""Building a teacher feature cache (the reader is :mod:`models.cached_teacher`).

:func:`build_cache` runs the teacher over every training image (all ranks of a torchrun job share the
work) and rank 0 writes the rows in dataset order. It is resumable: rows go into ``FILE.npy.partial``
with a done-mask ``FILE.npy.done.npy`` saved after every flush; the final file appears by an atomic
rename, then the manifest. Only rank 0 touches these files, so no shared filesystem between nodes is
needed.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.datasets import dataset_fingerprint
from models.cached_teacher import MANIFEST_VERSION, manifest_path, read_manifest
from models.errors import UserError
from models.io import atomic_npy, read_json, write_json
from tools.engine.distributed import DistInfo

log = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0  # at most this much work is lost when a build is interrupted


def _partial_paths(npy_path: str) -> tuple[str, str, str]:
    return npy_path + ".partial", npy_path + ".done.npy", npy_path + ".partial.json"


def _gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank (rank-major); identity in one process."""
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _broadcast_pending(done: np.ndarray | None, n: int, device: torch.device, world_size: int) -> np.ndarray:
    """Rank 0's done-mask sent to every rank; returns the sorted indices still to compute."""
    mask = torch.from_numpy(done.astype(np.uint8)) if done is not None else torch.zeros(n, dtype=torch.uint8)
    if world_size > 1:
        mask = mask.to(device)
        dist.broadcast(mask, src=0)
    return np.flatnonzero(mask.cpu().numpy() == 0)


def plan_rank(pending: np.ndarray, rank: int, world_size: int, batch: int) -> tuple[np.ndarray, int]:
    """This rank's indices, padded so every rank runs the same number of full batches.

    Step s covers ``pending[s*W*B : (s+1)*W*B]``, rank r its r-th block of B; the tail is padded by
    repeating the last pending index (those rows are recomputed but not written twice). Returns the
    rank's (steps * B,) indices and the number of steps.
    """
    per_step = world_size * batch
    steps = -(-len(pending) // per_step)
    padded = np.concatenate([pending, np.full(steps * per_step - len(pending), pending[-1] if len(pending) else 0)])
    return padded.reshape(steps, world_size, batch)[:, rank, :].reshape(-1), steps


def _prepare(npy_path: str, shape: tuple[int, int], build_info: dict, overwrite: bool) -> np.ndarray | None:
    """Rank 0: create or resume the partial file; returns the done-mask (None when already complete)."""
    data, done_path, info_path = _partial_paths(npy_path)
    if os.path.exists(npy_path) and os.path.exists(manifest_path(npy_path)) and not overwrite:
        old = read_manifest(npy_path)
        if {k: old.get(k) for k in build_info} == build_info:
            log.info("teacher cache %s is already complete for these settings; nothing to do", npy_path)
            return None
        raise UserError(
            f"'{npy_path}' already holds a teacher cache built with other settings; delete it, choose another "
            "--out, or pass --overwrite"
        )
    if os.path.exists(data) and os.path.exists(done_path) and os.path.exists(info_path):
        if read_json(info_path) == build_info:
            done = np.load(done_path)
            log.info("resuming %s: %d of %d rows already done", data, int(done.sum()), len(done))
            return done
        log.warning("discarding %s: it was started with other settings", data)
    np.lib.format.open_memmap(data, mode="w+", dtype=np.float16, shape=shape).flush()
    done = np.zeros(shape[0], dtype=bool)
    atomic_npy(done_path, done)
    write_json(info_path, build_info)
    return done


def _finish(npy_path: str, manifest: dict) -> None:
    data, done_path, info_path = _partial_paths(npy_path)
    os.replace(data, npy_path)  # atomic: the cache appears complete or not at all
    write_json(manifest_path(npy_path), manifest)
    for p in (done_path, info_path):
        os.remove(p)


@torch.inference_mode()
def _extract(teacher, loader, steps: int, writer, dist_info: DistInfo) -> None:
    """Run the teacher over this rank's batches; rank 0 gathers every rank's rows and hands them to ``writer``."""
    device = dist_info.device
    bar = tqdm(total=steps, desc="teacher features", disable=not dist_info.is_main, dynamic_ncols=True)
    for images, _, index in loader:
        x = images.to(device, non_blocking=True).float().div_(255.0)
        feats = teacher(x).to(torch.float16)  # (B, D)
        feats = _gather(feats, dist_info.world_size)
        index = _gather(index.to(device), dist_info.world_size)
        if dist_info.is_main:
            writer(index.cpu().numpy(), feats.cpu().numpy())
        bar.update(1)
    bar.close()


def _agree_to_start(npy_path: str, shape, build_info: dict, overwrite: bool, dist_info: DistInfo):
    """Rank 0 prepares the partial file; every rank learns whether to build (done-mask), stop or fail."""
    done, failure = None, None
    if dist_info.is_main:
        try:
            done = _prepare(npy_path, shape, build_info, overwrite)
        except UserError as exc:  # tell the other ranks before raising, or they would wait forever
            failure = exc
    code = 2 if failure else int(dist_info.is_main and done is None)
    status = torch.tensor([code], dtype=torch.uint8, device=dist_info.device)
    if dist_info.distributed:
        dist.broadcast(status, src=0)
    if failure is not None or status.item() == 2:
        raise failure or UserError(f"rank 0 could not prepare the teacher cache '{npy_path}' (see its message)")
    return done, status.item() == 1


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
) -> None:
    """Write ``teacher``'s features of every image of ``dataset`` (uint8 centre crops) to ``npy_path``.

    ``manifest`` describes the teacher and preprocessing; the dataset fingerprint and shape are added
    here. All ranks call this with the same arguments; rows land in dataset order whatever the padding.
    """
    n, device, world_size = len(dataset), dist_info.device, dist_info.world_size
    shape = (n, int(teacher.feat_dim))
    manifest = {"version": MANIFEST_VERSION, **manifest, **dataset_fingerprint(dataset), "shape": list(shape)}
    build_info = {k: manifest[k] for k in ("teacher", "preprocessing", "n_images", "paths_sha256", "classes", "shape")}
    done, finished = _agree_to_start(npy_path, shape, build_info, overwrite, dist_info)
    if finished:
        return
    pending = _broadcast_pending(done, n, device, world_size)
    indices, steps = plan_rank(pending, dist_info.rank, world_size, batch_size)
    loader = DataLoader(
        dataset, batch_size, sampler=indices.tolist(), num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    writer = _RowWriter(npy_path, done, len(pending)) if dist_info.is_main else None
    teacher.eval()
    _extract(teacher, loader, steps, writer, dist_info)
    if dist_info.is_main:
        writer.close()
        _finish(npy_path, {**manifest, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": world_size})
        log.info("teacher cache written: %s %s float16 and %s", npy_path, shape, manifest_path(npy_path))


class _RowWriter:
    """Rank 0's writer: rows into the memory-mapped partial file, the done-mask saved after each flush."""

    def __init__(self, npy_path: str, done: np.ndarray, n_pending: int) -> None:
        data, self.done_path, _ = _partial_paths(npy_path)
        self.rows = np.load(data, mmap_mode="r+")
        self.done, self.last_flush = done, time.monotonic()
        self.todo = n_pending

    def __call__(self, index: np.ndarray, feats: np.ndarray) -> None:
        keep = ~self.done[index]  # padding repeats rows already written in this step
        index, feats = index[keep], feats[keep]
        index, first = np.unique(index, return_index=True)
        self.rows[index] = feats[first]
        self.done[index] = True
        self.todo -= len(index)
        if time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.rows.flush()  # rows reach the file before the mask says they are done
        atomic_npy(self.done_path, self.done)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.todo or not self.done.all():
            raise RuntimeError(f"teacher cache build ended with {int((~self.done).sum())} rows missing")
        del self.rows
