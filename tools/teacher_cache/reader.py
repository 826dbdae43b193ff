"""The cached teacher: a teacher feature cache read back with the live teacher's call.

A cache is ``FILE.npy``, one contiguous float16 array, and ``FILE.json`` beside it saying what the rows
are: the image list (its fingerprint: count, classes, SHA-256 of the relative paths), the teacher (arch,
format, SHA-256 of the weights file, projection or pooled feature), the preprocessing and the views.
Two kinds, written by ``tools/teacher_cache/builder.py`` (``python -m tools.cache_teacher_features``):

- centre crop (the paper's cached mode): (N, D), row i the feature of training image i's centre crop
  (the dataset's sorted order), whatever the epoch;
- K views: (K, N, D), row [v - 1, i] the feature of exactly the crop the training loader gives image i
  in epoch v (same seed, view mode, crop size and decoder). Epoch e reads view ((e - 1) mod K) + 1,
  and the loader's crops repeat with the same period, so with K >= epochs training regresses the live
  teacher's targets (to float16 rounding).

Training memory-maps the array, so ranks on one machine share its pages and no process holds a
private copy, and gathers a batch's rows by index in one vectorised read. That read (random page-ins,
from a network file system too) happens in the prefetch thread one batch ahead
(:meth:`CachedTeacher.read_ahead`, called by :class:`data.prefetch.DevicePrefetcher`), into pinned
memory, and reaches the device by a copy the training thread never waits for.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

import numpy as np
import torch

from models.backbones import TEACHER_ALIASES
from models.errors import UserError
from models.io import file_sha256, read_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 3  # 2: the dataset fingerprint's names (n_images for count); 3: the views section
CENTRE_CROP = {"mode": "centre crop", "n_views": 1}  # the views of a version 1-2 cache


def autocast_name(dtype: torch.dtype | None) -> str:
    """How the manifest records the autocast a cache's teacher ran under (caches made before: float32)."""
    return str(dtype or "float32")


def manifest_path(npy_path: str) -> str:
    """``FILE.npy`` -> ``FILE.json``."""
    root, ext = os.path.splitext(npy_path)
    return (root if ext == ".npy" else npy_path) + ".json"


def dense_path(npy_path: str) -> str:
    """``FILE.npy`` -> ``FILE.dense.npy`` (the dense targets of a cache built with ``--dense``)."""
    root, ext = os.path.splitext(npy_path)
    return (root if ext == ".npy" else npy_path) + ".dense.npy"


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
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"teacher cache manifest '{path}' is unreadable; rebuild the cache")
    if manifest.get("version") == 1:  # the same fingerprint, its image count under its first name
        manifest = dict(manifest, version=2)
        manifest["n_images"] = manifest.pop("count", None)
    if manifest.get("version") == 2:  # centre crops only, before K-view caches existed
        manifest = dict(manifest, version=MANIFEST_VERSION, views=CENTRE_CROP)
    if manifest.get("version") != MANIFEST_VERSION:
        raise UserError(f"teacher cache manifest '{path}' has version {manifest.get('version')}; rebuild the cache")
    return manifest


def check_manifest(manifest: dict, fingerprint: dict, npy_path: str) -> None:
    """Refuse a cache built for another image set (``fingerprint``: data.datasets.dataset_fingerprint)."""
    if manifest["n_images"] != fingerprint["n_images"]:
        problem = f"it holds {manifest['n_images']} images, the training set has {fingerprint['n_images']}"
    elif manifest["classes"] != fingerprint["classes"]:
        extra = sorted(set(manifest["classes"]) ^ set(fingerprint["classes"]))[:3]
        problem = f"its class list differs (e.g. {extra})" if extra else "its classes are in another order"
    elif manifest["paths_sha256"] != fingerprint["paths_sha256"]:
        problem = "its image files differ (same count, other paths)"
    else:
        return
    raise UserError(
        f"teacher cache '{npy_path}' was built for another image set: {problem}; rebuild it for this data "
        "(python -m tools.cache_teacher_features with the same data folder, --dataset and --class_list)"
    )


class CachedTeacher:
    """Answers the live teacher's call ``targets(images, indices) -> (B, D) float32`` from the cache.

    The array is memory-mapped (``np.load(mmap_mode="r")``); with ``on_device`` the rows in use (the
    whole centre-crop array, or the current view of a K-view cache) are copied into ``device`` memory
    as float16 and gathered there with ``index_select`` (no host round trip). ``set_epoch(e)`` selects
    view ((e - 1) mod K) + 1 of a K-view cache; a centre-crop cache serves every epoch alike.
    ``read_ahead(indices)`` gathers a batch's rows before its step (from another thread); ``targets``
    called with that same index tensor then takes them instead of reading again.
    """

    AHEAD = 8  # rows read ahead and not yet taken, at most (the prefetcher keeps two or three batches ahead)

    def __init__(
        self,
        npy_path: str,
        fingerprint: dict | None = None,
        device: torch.device | str = "cpu",
        on_device: bool = False,
    ) -> None:
        self.manifest = read_manifest(npy_path)
        if fingerprint is not None:
            check_manifest(self.manifest, fingerprint, npy_path)
        self.feats = _load_array(npy_path, self.manifest["shape"])
        teacher = self.manifest["teacher"]
        self.feat_dim, self.arch, self.fmt = int(self.feats.shape[-1]), teacher["arch"], teacher["format"]
        self.views = self.manifest["views"]
        # K-view caches are (K, N, D); a centre-crop cache (N, D) is its one view for every epoch.
        self.view_period = int(self.feats.shape[0]) if self.feats.ndim == 3 else None
        self.device, self.on_device = torch.device(device), on_device
        self.view, self.rows, self.table = 0, None, None
        self._ahead: deque = deque(maxlen=self.AHEAD)  # (index tensor, view, rows (B, D) on the device)
        self._lock = threading.Lock()
        self.path, self.objective, self.dense_dim, self.dense_grid = npy_path, "global", 0, (0, 0)
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        """Serve the targets of ``epoch`` (1-based): view ((epoch - 1) mod K) + 1 of a K-view cache."""
        view = (epoch - 1) % self.view_period + 1 if self.view_period else 1
        if self.rows is not None and view == self.view:
            return
        self.view, self.rows = view, self.feats[view - 1] if self.view_period else self.feats
        if self.on_device:
            self.table = self._to_device(self.device)
            self.on_device = self.table is not None
        self._select_dense()

    def _to_device(self, device: torch.device, rows: np.ndarray | None = None, what: str = "") -> torch.Tensor | None:
        """``rows`` (default: the pooled rows in use) copied to ``device``, or None (memory-mapped reads) when
        they do not fit in half its free memory."""
        rows = self.rows if rows is None else rows
        size = rows.nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            for old in (self.table, getattr(self, "dense_table", None)):  # the view they replace
                free += old.numel() * old.element_size() if old is not None else 0
            if size > 0.5 * free:  # leave room for the training itself
                log.warning(
                    "teacher cache%s (%.1f GiB) does not fit in half the free memory of %s (%.1f GiB); "
                    "reading it memory-mapped instead",
                    what,
                    size / 2**30,
                    device,
                    free / 2**30,
                )
                return None
        if not what:  # the pooled view it replaces, freed before the copy
            self.table = None
        log.info("teacher cache view %d%s: %.2f GiB copied to %s", self.view, what, size / 2**30, device)
        return torch.from_numpy(np.array(rows)).to(device)  # one read of the rows in use

    def targets(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Rows ``indices`` (B,) of the current view as float32 (B, D) on the run's device; ``images`` unused.

        The rows :meth:`read_ahead` gathered for this very index tensor, when it did; else read now. After
        :meth:`use_objective` ``dense`` / ``both``: ``{"dense": (B, C, h, w)}`` (and ``"global": (B, D)``).
        """
        with self._lock:
            for k, (index, view, rows) in enumerate(self._ahead):
                if index is indices and view == self.view:
                    for _ in range(k + 1):  # this batch's and any older batch's never taken
                        self._ahead.popleft()
                    return rows
        return self.read(indices)

    def read_ahead(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Gather the rows of a coming batch now (the prefetch thread); returns the device tensors made."""
        rows = self.read(indices)
        with self._lock:
            self._ahead.append((indices, self.view, rows))
        return list(rows.values()) if isinstance(rows, dict) else [rows]

    def read(self, indices: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Rows ``indices`` (B,) of the current view as float32 (B, D) on the run's device, without a host wait
        (with a dense objective, the dict :meth:`targets` describes)."""
        pooled = self._gather(self.rows, self.table, indices)
        if self.objective == "global":
            return pooled
        h, w = self.dense_grid
        dense = self._gather(self.dense_rows, self.dense_table, indices)
        dense = dense.reshape(-1, h, w, self.dense_dim).permute(0, 3, 1, 2)  # (B, C, h, w)
        return {"dense": dense} if self.objective == "dense" else {"global": pooled, "dense": dense}

    def _gather(self, rows: np.ndarray, table: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` of ``rows`` (or of its device copy ``table``) as float32 on the run's device.

        From the device table: ``index_select`` there. From the mapped file: one vectorised gather into
        pinned host memory (on CUDA), then a non-blocking copy to the device.
        """
        if table is not None:
            return table.index_select(0, indices.to(table.device, non_blocking=True)).float()
        pinned = self.device.type == "cuda"
        picked = torch.empty(len(indices), rows.shape[-1], dtype=torch.float16, pin_memory=pinned)
        np.take(rows, indices.cpu().numpy(), axis=0, out=picked.numpy())
        return picked.to(self.device, non_blocking=True).float()

    def use_objective(self, objective: str, blocks: int = 1) -> CachedTeacher:
        """Serve the targets of ``--loss objective``: a dense one needs a cache built with ``--dense`` (and the
        same ``--dense_blocks``); the dense rows are memory-mapped (or copied to the device) like the pooled."""
        self.objective = objective
        if objective == "global":
            return self
        dense = self.manifest.get("dense")
        if not dense:
            raise UserError(
                f"teacher cache '{self.path}' holds pooled features only; --loss {objective} needs its dense targets: "
                "rebuild it with python -m tools.cache_teacher_features ... --dense"
            )
        if dense["blocks"] != blocks:
            raise UserError(
                f"teacher cache '{self.path}' holds the tokens of the last {dense['blocks']} block(s), but "
                f"--dense_blocks is {blocks}; match the flag to the cache or rebuild it"
            )
        self.dense_feats = _load_array(dense_path(self.path), dense["shape"])
        self.dense_dim, self.dense_grid = int(dense["channels"]), tuple(dense["grid"])
        self.dense_view, self.dense_on_device = 0, True
        self._select_dense()
        log.info("teacher: cached dense targets %d x %d x %d (the teacher's %s grid: %s) from %s", self.dense_dim,
                 *self.dense_grid, "x".join(map(str, dense["teacher_grid"])), dense["source"],
                 dense_path(self.path))  # fmt: skip
        return self

    def _select_dense(self) -> None:
        """The current view's dense rows (copied to the device with ``on_device``, as the pooled rows)."""
        if self.objective == "global" or self.dense_view == self.view:
            return
        self.dense_view = self.view
        self.dense_rows = self.dense_feats[self.view - 1] if self.view_period else self.dense_feats
        self.dense_table = None
        if self.on_device and self.dense_on_device:
            self.dense_table = self._to_device(self.device, self.dense_rows, " (dense targets)")
            self.dense_on_device = self.dense_table is not None


def _load_array(npy_path: str, shape: list[int]) -> np.ndarray:
    """The memory-mapped float16 array of a cache file, checked against the shape its manifest states."""
    try:
        feats = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"teacher cache '{npy_path}' is unreadable ({exc}); rebuild it") from exc
    if list(feats.shape) != list(shape) or feats.dtype != np.float16:
        raise UserError(
            f"teacher cache '{npy_path}' holds {feats.dtype} {tuple(feats.shape)} but its manifest says float16 "
            f"{tuple(shape)}; rebuild it"
        )
    return feats


def _check_teacher(built: dict, teacher: dict, npy_path: str) -> None:
    """Refuse a cache that contradicts what the user says the teacher is (arch, weights, --teacher_fc)."""
    arch = TEACHER_ALIASES.get(teacher.get("arch"), teacher.get("arch"))
    if arch not in (None, built["arch"]):
        raise UserError(
            f"teacher cache '{npy_path}' was built with teacher {built['arch']}, but --arch_teacher is "
            f"{arch}; pass --arch_teacher {built['arch']} or leave it unset"
        )
    if bool(teacher.get("use_fc")) != bool(built.get("use_fc")):
        what = "projection outputs (--teacher_fc)" if built.get("use_fc") else "pooled features"
        raise UserError(f"teacher cache '{npy_path}' holds {what}; match --teacher_fc to it or rebuild the cache")
    pool = teacher.get("pool") or "auto"
    if pool != "auto" and pool != built.get("pool"):
        raise UserError(
            f"teacher cache '{npy_path}' holds {built.get('pool') or 'pooled'} features, not --teacher_pool {pool}; "
            "match the flag to the cache or rebuild it"
        )
    if teacher.get("weights") and file_sha256(teacher["weights"]) != built["weights_sha256"]:
        raise UserError(
            f"teacher cache '{npy_path}' was built from other weights than --teacher_weights "
            f"'{teacher['weights']}' (SHA-256 differs); rebuild the cache or drop --teacher_weights"
        )


VIEW_FIELDS = {  # what a K-view cache must share with the run: the difference in words, the flags that set it
    "mode": (
        "holds {c} crops, but this run uses {r}",
        "--single_aug/--weak_weak/--weak_strong/--min_crop_scale/--no_flip",
    ),
    "image_size": ("holds {c} px crops, but this run's --image_size is {r}", "--image_size"),
    "seed": ("holds the crops of --seed {c}, but this run's --seed is {r}", "--seed"),
    "decode": ("holds crops decoded with --decode {c}, but this run decodes with --decode {r}", "--decode"),
}


def check_views(views: dict, run: dict, npy_path: str) -> None:
    """Refuse a K-view cache whose crops are not the run's (``run``: ``TrainViews.record(seed)``)."""
    for key, (difference, flag) in VIEW_FIELDS.items():
        if views.get(key) != run.get(key):
            raise UserError(
                f"teacher cache '{npy_path}' {difference.format(c=views.get(key), r=run.get(key))}; train with "
                f"the cache's {flag} or rebuild the cache with this run's"
            )


def _check_crops(cached: CachedTeacher, npy_path: str, image_size: int | None, views: dict | None) -> None:
    """K views: the run's crops must be the cached ones; centre crops: another crop size only warns."""
    if cached.view_period:
        if views is not None:
            check_views(cached.views, views, npy_path)
        return
    crop = cached.manifest["preprocessing"]["crop_size"]
    if image_size is not None and image_size != crop:
        log.warning(
            "--image_size %d differs from the cache's %d px centre crops: the student regresses features of "
            "another crop size (allowed, but not the paper's setting)",
            image_size,
            crop,
        )


def open_cached_teacher(
    npy_path: str,
    fingerprint: dict | None,
    device: torch.device,
    on_device: bool = False,
    image_size: int | None = None,
    teacher: dict | None = None,
    views: dict | None = None,
    epochs: int | None = None,
    autocast: str | None = None,
) -> CachedTeacher:
    """A :class:`CachedTeacher` checked against the dataset and against what the user says the teacher is.

    ``teacher`` may hold ``arch``, ``weights`` (a file, compared by SHA-256), ``use_fc`` and ``pool``; a cache
    that contradicts any given one is refused. ``views`` (``TrainViews.record(seed)`` of the run) must match
    a K-view cache's crops; a training crop size other than a centre-crop cache's is only warned about.
    With ``epochs`` above a K-view cache's K, the log says once that views repeat; with ``autocast`` (the
    run's, :func:`autocast_name`) other than the cache's, that its rows are not the live teacher's.
    """
    cached = CachedTeacher(npy_path, fingerprint, device, on_device)
    built = cached.manifest["teacher"]
    _check_teacher(built, dict(teacher or {}), npy_path)
    _check_crops(cached, npy_path, image_size, views)
    built_under = cached.manifest["preprocessing"].get("autocast", autocast_name(None))
    if autocast is not None and autocast != built_under:  # a choice, not a fault: both are the teacher's features
        log.info(
            "teacher cache '%s' was built under %s autocast, this run's live teacher would run under %s: its rows "
            "equal a live teacher's to that precision only (build with the run's --amp for equal targets)",
            npy_path,
            built_under,
            autocast,
        )
    k = cached.view_period
    log.info(
        "teacher: cached %s (%s) features %s from %s (%s)%s",
        built["arch"],
        built["format"],
        tuple(cached.feats.shape),
        npy_path,
        f"{k} views of {cached.views['mode']}" if k else "centre crops",
        ", on device" if cached.table is not None else ", memory-mapped",
    )
    if k and epochs and epochs > k:  # a choice, not a fault: said once, by rank 0
        log.info(
            "teacher cache '%s' holds %d views for %d epochs: epoch e reads view ((e - 1) mod %d) + 1 and the "
            "loader repeats that view's crops, so every view serves about %.1f epochs",
            npy_path,
            k,
            epochs,
            k,
            epochs / k,
        )
    return cached
