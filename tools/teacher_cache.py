"""Teacher feature cache: one contiguous float16 array (N, D) in dataset order, and its manifest.

``FILE.npy`` holds row i = the teacher's feature of training image i (the dataset's sorted order);
``FILE.json`` beside it says what the rows are: the image list (count, SHA-256 of the relative paths),
the class list, the teacher (arch, format, SHA-256 of the weights file, projection or pooled feature)
and the preprocessing (Resize, CenterCrop, the teacher's own normalisation). Training reads the array
memory-mapped, so ranks on one machine share its pages and no process holds a private copy, and
gathers a batch's rows by index in one vectorised read (the original filled each batch with a Python
loop over a 10-40 GB in-RAM dict).

Building (:func:`build_cache`) is resumable: rows go into ``FILE.npy.partial`` with a done-mask
``FILE.npy.done.npy`` saved after every flush; the final file appears by an atomic rename, then the
manifest. Only rank 0 touches these files, so no shared filesystem between nodes is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.errors import UserError
from models.formats import file_sha256
from models.teachers import TEACHER_ALIASES
from tools.metric_logger import write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
FLUSH_SECONDS = 60.0  # at most this much work is lost when a build is interrupted


# ============ paths, hashes and the manifest ============
def manifest_path(npy_path: str) -> str:
    """``FILE.npy`` -> ``FILE.json``."""
    root, ext = os.path.splitext(npy_path)
    return (root if ext == ".npy" else npy_path) + ".json"


def _partial_paths(npy_path: str) -> tuple[str, str, str]:
    return npy_path + ".partial", npy_path + ".done.npy", npy_path + ".partial.json"


def dataset_identity(dataset) -> dict:
    """What a cache must agree on with the training set: image count, relative paths (hashed), classes."""
    rel = "\n".join(path.replace(os.sep, "/") for path, _ in dataset.samples)
    return {
        "count": len(dataset.samples),
        "paths_sha256": hashlib.sha256(rel.encode()).hexdigest(),
        "classes": list(dataset.classes),
    }


def read_manifest(npy_path: str) -> dict:
    """The manifest of a finished cache, or a UserError saying why there is none."""
    path = manifest_path(npy_path)
    if not os.path.exists(npy_path):
        hint = (
            " (its build was interrupted: rerun the same build command to finish it)"
            if os.path.exists(npy_path + ".partial")
            else ""
        )
        raise UserError(
            f"teacher cache '{npy_path}' does not exist{hint}; build it with python -m tools.cache_teacher_features"
        )
    if not os.path.exists(path):
        raise UserError(
            f"teacher cache '{npy_path}' has no manifest '{path}': it is unfinished or was not built by "
            "tools.cache_teacher_features; rebuild it"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"teacher cache manifest '{path}' is unreadable ({exc}); rebuild the cache") from exc
    if manifest.get("version") != MANIFEST_VERSION:
        raise UserError(f"teacher cache manifest '{path}' has version {manifest.get('version')}; rebuild the cache")
    return manifest


def check_manifest(manifest: dict, dataset, npy_path: str) -> None:
    """Refuse a cache built for another image set, naming what differs."""
    want = dataset_identity(dataset)
    if manifest["count"] != want["count"]:
        problem = f"it holds {manifest['count']} images, the training set has {want['count']}"
    elif manifest["classes"] != want["classes"]:
        extra = sorted(set(manifest["classes"]) ^ set(want["classes"]))[:3]
        problem = f"its class list differs (e.g. {extra})" if extra else "its classes are in another order"
    elif manifest["paths_sha256"] != want["paths_sha256"]:
        problem = "its image files differ (same count, other paths)"
    else:
        return
    raise UserError(
        f"teacher cache '{npy_path}' was built for another image set: {problem}; rebuild it for this data "
        "(python -m tools.cache_teacher_features with the same data folder, --dataset and --class_list)"
    )


# ============ training: the cached teacher ============
class CachedTeacher:
    """Answers the live teacher's call ``targets(images, indices) -> (B, D) float32`` from the cache.

    The array is memory-mapped (``np.load(mmap_mode="r")``); with ``on_device`` it is copied once into
    ``device`` memory as float16 and gathered there with ``index_select`` (no host round trip).
    """

    def __init__(self, npy_path: str, dataset=None, device: torch.device | str = "cpu", on_device: bool = False):
        self.manifest = read_manifest(npy_path)
        if dataset is not None:
            check_manifest(self.manifest, dataset, npy_path)
        try:
            self.feats = np.load(npy_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(f"teacher cache '{npy_path}' is unreadable ({exc}); rebuild it") from exc
        if list(self.feats.shape) != self.manifest["shape"] or self.feats.dtype != np.float16:
            raise UserError(
                f"teacher cache '{npy_path}' holds {self.feats.dtype} {tuple(self.feats.shape)} but its manifest "
                f"says float16 {tuple(self.manifest['shape'])}; rebuild it"
            )
        teacher = self.manifest["teacher"]
        self.feat_dim, self.arch, self.fmt = int(self.feats.shape[1]), teacher["arch"], teacher["format"]
        self.table = self._to_device(torch.device(device)) if on_device else None

    def _to_device(self, device: torch.device) -> torch.Tensor | None:
        size = self.feats.nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > 0.5 * free:  # leave room for the training itself
                log.warning(
                    "teacher cache (%.1f GiB) does not fit in half the free memory of %s (%.1f GiB); "
                    "reading it memory-mapped instead",
                    size / 2**30,
                    device,
                    free / 2**30,
                )
                return None
        log.info("teacher cache: %.2f GiB copied to %s", size / 2**30, device)
        return torch.from_numpy(np.array(self.feats)).to(device)  # one read of the whole file

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (B,) of the cache as float32 (B, D) on the images' device; ``images`` unused."""
        if self.table is not None:
            return self.table.index_select(0, indices.to(self.table.device)).float()
        rows = self.feats[indices.cpu().numpy()]  # one vectorised gather from the mapped file
        return torch.from_numpy(rows).to(images.device).float()


def open_cached_teacher(
    npy_path: str,
    dataset,
    device: torch.device,
    on_device: bool = False,
    image_size: int | None = None,
    teacher: dict | None = None,
) -> CachedTeacher:
    """A :class:`CachedTeacher` checked against the dataset and against what the user says the teacher is.

    ``teacher`` may hold ``arch``, ``weights`` (a file, compared by SHA-256) and ``use_fc``; a cache that
    contradicts any given one is refused. A training crop size other than the cache's is only warned about.
    """
    cached = CachedTeacher(npy_path, dataset, device, on_device)
    built = cached.manifest["teacher"]
    teacher = dict(teacher or {})
    teacher["arch"] = TEACHER_ALIASES.get(teacher.get("arch"), teacher.get("arch"))
    if teacher["arch"] not in (None, built["arch"]):
        raise UserError(
            f"teacher cache '{npy_path}' was built with teacher {built['arch']}, but --arch_teacher is "
            f"{teacher['arch']}; pass --arch_teacher {built['arch']} or leave it unset"
        )
    if bool(teacher.get("use_fc")) != bool(built.get("use_fc")):
        what = "projection outputs (--teacher_fc)" if built.get("use_fc") else "pooled features"
        raise UserError(f"teacher cache '{npy_path}' holds {what}; match --teacher_fc to it or rebuild the cache")
    if teacher.get("weights") and file_sha256(teacher["weights"]) != built["weights_sha256"]:
        raise UserError(
            f"teacher cache '{npy_path}' was built from other weights than --teacher_weights "
            f"'{teacher['weights']}' (SHA-256 differs); rebuild the cache or drop --teacher_weights"
        )
    crop = cached.manifest["preprocessing"]["crop_size"]
    if image_size is not None and image_size != crop:
        log.warning(
            "--image_size %d differs from the cache's %d px centre crops: the student regresses features of "
            "another crop size (allowed, but not the paper's setting)",
            image_size,
            crop,
        )
    log.info(
        "teacher: cached %s (%s) features %s from %s%s",
        built["arch"],
        built["format"],
        tuple(cached.feats.shape),
        npy_path,
        ", on device" if cached.table is not None else ", memory-mapped",
    )
    return cached


# ============ building the cache ============
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
        with open(manifest_path(npy_path)) as f:
            old = json.load(f)
        if {k: old.get(k) for k in build_info} == build_info:
            log.info("teacher cache %s is already complete for these settings; nothing to do", npy_path)
            return None
        raise UserError(
            f"'{npy_path}' already holds a teacher cache built with other settings; delete it, choose another "
            "--out, or pass --overwrite"
        )
    if os.path.exists(data) and os.path.exists(done_path) and os.path.exists(info_path):
        with open(info_path) as f:
            if json.load(f) == build_info:
                done = np.load(done_path)
                log.info("resuming %s: %d of %d rows already done", data, int(done.sum()), len(done))
                return done
        log.warning("discarding %s: it was started with other settings", data)
    np.lib.format.open_memmap(data, mode="w+", dtype=np.float16, shape=shape).flush()
    done = np.zeros(shape[0], dtype=bool)
    _save_mask(done, done_path)
    write_json(info_path, build_info)
    return done


def _save_mask(done: np.ndarray, path: str) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, done)
    os.replace(tmp, path)


def _finish(npy_path: str, manifest: dict) -> None:
    data, done_path, info_path = _partial_paths(npy_path)
    os.replace(data, npy_path)  # atomic: the cache appears complete or not at all
    write_json(manifest_path(npy_path), manifest)
    for p in (done_path, info_path):
        os.remove(p)


@torch.inference_mode()
def _extract(teacher, loader, steps: int, writer, device: torch.device, world_size: int, is_main: bool) -> None:
    """Run the teacher over this rank's batches; rank 0 gathers every rank's rows and hands them to ``writer``."""
    bar = tqdm(total=steps, desc="teacher features", disable=not is_main, dynamic_ncols=True)
    for images, _, index in loader:
        x = images.to(device, non_blocking=True).float().div_(255.0)
        feats = teacher(x).to(torch.float16)  # (B, D)
        feats = _gather(feats, world_size)
        index = _gather(index.to(device), world_size)
        if is_main:
            writer(index.cpu().numpy(), feats.cpu().numpy())
        bar.update(1)
    bar.close()


def build_cache(
    teacher: torch.nn.Module,
    dataset,
    npy_path: str,
    manifest: dict,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
) -> None:
    """Write ``teacher``'s features of every image of ``dataset`` (uint8 centre crops) to ``npy_path``.

    ``manifest`` describes the teacher and preprocessing; the dataset identity and shape are added here.
    All ranks call this with the same arguments; rows land in dataset order whatever the padding.
    """
    n = len(dataset)
    shape = (n, int(teacher.feat_dim))
    manifest = {"version": MANIFEST_VERSION, **manifest, **dataset_identity(dataset), "shape": list(shape)}
    build_info = {k: manifest[k] for k in ("teacher", "preprocessing", "count", "paths_sha256", "classes", "shape")}
    done, failure = None, None
    if rank == 0:
        try:
            done = _prepare(npy_path, shape, build_info, overwrite)
        except UserError as exc:  # tell the other ranks before raising, or they would wait forever
            failure = exc
    status = torch.tensor([2 if failure else int(rank == 0 and done is None)], dtype=torch.uint8, device=device)
    if world_size > 1:
        dist.broadcast(status, src=0)
    if failure is not None or status.item() == 2:
        raise failure or UserError(f"rank 0 could not prepare the teacher cache '{npy_path}' (see its message)")
    if status.item() == 1:
        return
    pending = _broadcast_pending(done, n, device, world_size)
    indices, steps = plan_rank(pending, rank, world_size, batch_size)
    loader = DataLoader(
        dataset, batch_size, sampler=indices.tolist(), num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    writer = _RowWriter(npy_path, done, len(pending)) if rank == 0 else None
    teacher.eval()
    _extract(teacher, loader, steps, writer, device, world_size, rank == 0)
    if rank == 0:
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
        _save_mask(self.done, self.done_path)
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.todo or not self.done.all():
            raise RuntimeError(f"teacher cache build ended with {int((~self.done).sum())} rows missing")
        del self.rows
