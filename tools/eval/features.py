"""Ordered feature extraction and a feature store that never serves stale features.

``extract_features`` runs a frozen network over a dataset split across the ranks of a torchrun job
(or one process) and returns the features in **dataset order**: every sample comes back with its
index, and rows are placed by that index, so the sampler's wrap-around padding (duplicates on the
last ranks) can neither shift nor double-count a row. ``FeatureStore`` keeps float16 features with a
manifest holding the checkpoint's SHA-256, the preprocessing and a fingerprint of the image list;
features are reused only when all of them match.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.datasets import IndexedImageFolder, split_folder
from data.loaders import build_loader
from data.transforms import CenterCrop
from models.errors import UserError
from models.io import atomic_npy, differences, write_json
from models.simreg import fp32_or_wider
from tools.engine.distributed import DistInfo
from tools.engine.step import autocast

log = logging.getLogger(__name__)

MANIFEST = "features_manifest.json"
MANIFEST_VERSION = 2  # 2: the data fingerprint records the relative paths


# ---------------------------------------------------------------- data
def build_eval_dataset(
    root: str, split: str, resize_size: int, crop_size: int, classes: list[str] | None = None
) -> IndexedImageFolder:
    """``root/split`` as an ImageFolder with the centre-crop preset (uint8 (3, crop, crop) samples)."""
    folder = split_folder(root, split)
    if crop_size > resize_size:
        raise UserError(f"--crop_size {crop_size} is larger than --resize_size {resize_size}; use crop <= resize")
    return IndexedImageFolder(folder, CenterCrop(resize_size, crop_size), classes)


# ---------------------------------------------------------------- extraction
@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: IndexedImageFolder,
    *,
    batch_size: int,
    num_workers: int,
    dist_info: DistInfo,
    amp_dtype: torch.dtype | None = None,
    desc: str = "features",
    on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Features (N, D) float32 and labels (N,) int64, rows in dataset order; the features on the CPU, or with
    ``on_device`` where they were computed (k-NN searches there: no round trip through host memory).

    ``model`` maps float images in [0, 1] (B, 3, H, W) to (B, D); it is put in eval mode. Under
    torchrun each rank processes its share (``batch_size`` per rank) and the rows are gathered by
    sample index. Rank 0 receives the result; other ranks get None.
    """
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    was_training = model.training
    model.eval()
    loader = build_loader(
        dataset,
        batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        drop_last=False,
        pin_memory=device.type == "cuda",
    )
    cast = autocast(device, amp_dtype)
    # the network's own precision: float32, or float64 for a --float64 run's k-NN monitor
    dtype = torch.promote_types(next((p.dtype for p in model.parameters()), torch.float32), torch.float32)
    feats, indices = [], []
    bar = tqdm(loader, desc=desc, disable=None if rank == 0 else True, leave=False)  # None: off when not a TTY
    for images, _, index in bar:
        x = images.to(device, non_blocking=True).to(dtype).div_(255.0)
        with cast:
            out = model(x)
        feats.append(fp32_or_wider(out))
        indices.append(index.to(device, non_blocking=True))
    model.train(was_training)
    local = torch.cat(feats) if feats else torch.empty(0, 0, device=device)
    local_idx = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=device)
    stay = on_device and features_fit_on_device(len(dataset), local.shape[1], device)
    if on_device and device.type == "cuda" and not stay and rank == 0:
        log.info("%s: %d x %d features do not fit in %s's free memory; gathering them in host memory", desc,
                 len(dataset), local.shape[1], device)  # fmt: skip
    out = _gather_in_order(local, local_idx, len(dataset), world_size, keep=rank == 0,
                           out_device=device if stay else torch.device("cpu"))  # fmt: skip
    if out is None:
        return None
    return out, torch.as_tensor(dataset.targets, dtype=torch.long)


def _gather_in_order(
    local: torch.Tensor,
    local_idx: torch.Tensor,
    n: int,
    world_size: int,
    keep: bool,
    chunk_rows: int = 65536,
    out_device: torch.device | str = "cpu",
):
    """Place every rank's rows at their sample index in one (n, D) tensor on ``out_device``.

    Every rank holds the same number of rows (the sampler pads), so ``all_gather`` works on equal
    shapes; it runs in chunks of ``chunk_rows`` to bound device memory on large datasets.
    """
    dim = local.shape[1]
    out = torch.empty(n, dim, device=out_device) if keep else None
    seen = torch.zeros(n, dtype=torch.bool, device=out_device) if keep else None
    for start in range(0, max(local.shape[0], 1), chunk_rows):
        rows, idx = local[start : start + chunk_rows].contiguous(), local_idx[start : start + chunk_rows].contiguous()
        if world_size > 1:
            all_rows = [torch.empty_like(rows) for _ in range(world_size)]
            all_idx = [torch.empty_like(idx) for _ in range(world_size)]
            dist.all_gather(all_rows, rows)
            dist.all_gather(all_idx, idx)
            rows, idx = torch.cat(all_rows), torch.cat(all_idx)
        if keep and idx.numel():
            idx = idx.to(out_device)
            out[idx] = rows.to(out_device)
            seen[idx] = True
    if keep and not bool(seen.all()):
        raise RuntimeError(f"feature extraction missed {int((~seen).sum())} of {n} samples")
    return out


def features_fit_on_device(n_rows: int, dim: int, device: torch.device, free_bytes: int | None = None) -> bool:
    """Whether ``n_rows`` x ``dim`` features can stay on ``device`` for the k-NN search: a CUDA device with room
    for about four float32 copies (gathered, float16-rounded, normalised, and the search's blocks) in 80% of
    its free memory (``free_bytes``: measured when not given)."""
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return 4 * n_rows * dim * 4 <= 0.8 * free_bytes


def broadcast_tensor(t: torch.Tensor | None, shape: tuple[int, ...], dist_info: DistInfo) -> torch.Tensor:
    """Rank 0's tensor on every rank (float32, ``shape``); the identity in a single process."""
    device = dist_info.device
    if not dist_info.distributed:
        return t.to(device)
    buf = t.to(device, torch.float32).contiguous() if t is not None else torch.empty(shape, device=device)
    dist.broadcast(buf, src=0)
    return buf


# ---------------------------------------------------------------- the store
class FeatureStore:
    """float16 ``<split>_feats.npy`` + int64 ``<split>_labels.npy`` in a folder, with a manifest.

    ``key`` (a JSON-able dict: checkpoint SHA-256, format, preprocessing, data fingerprints) decides
    validity: :meth:`check` compares it with the manifest's. The manifest is removed before new arrays
    are written and rewritten after, so an interrupted save leaves no valid-looking stale cache.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.manifest_path = os.path.join(folder, MANIFEST)

    def paths(self, split: str) -> tuple[str, str]:
        return os.path.join(self.folder, f"{split}_feats.npy"), os.path.join(self.folder, f"{split}_labels.npy")

    def manifest(self) -> dict | None:
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def check(self, key: dict, splits: tuple[str, ...]) -> tuple[str, str]:
        """("match" | "absent" | "stale", reason)."""
        manifest = self.manifest()
        if manifest is None:
            return "absent", f"no {MANIFEST} in {self.folder}"
        if manifest.get("version") != MANIFEST_VERSION:
            return "stale", f"manifest version {manifest.get('version')}"
        diffs = differences(manifest.get("key", {}), key)
        if diffs:
            return "stale", "; ".join(diffs[:4])
        missing = [s for s in splits if s not in manifest.get("splits", {}) or not os.path.isfile(self.paths(s)[0])]
        if missing:
            return "absent", f"no saved features for split(s) {missing}"
        return "match", "same checkpoint, preprocessing and images"

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D) float16, labels (N,) int64) as saved."""
        feats_path, labels_path = self.paths(split)
        feats, labels = np.load(feats_path), np.load(labels_path)
        expected = self.manifest()["splits"][split]["shape"]
        if list(feats.shape) != expected or labels.shape[0] != expected[0]:
            raise UserError(f"'{feats_path}' does not have the shape its manifest records; delete {self.folder}")
        return torch.from_numpy(feats), torch.from_numpy(labels)

    def save(self, key: dict, arrays: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict) -> None:
        """Write ``{split: (feats, labels)}`` as float16 / int64 and the manifest last."""
        os.makedirs(self.folder, exist_ok=True)
        old = self.manifest()
        # Splits saved earlier under the same key stay valid (e.g. train from k-NN, val from the probe).
        splits = dict(old.get("splits", {})) if old and old.get("key") == key else {}
        if os.path.exists(self.manifest_path):
            os.remove(self.manifest_path)
        for split, (feats, labels) in arrays.items():
            feats_path, labels_path = self.paths(split)
            atomic_npy(feats_path, feats.to(torch.float16).cpu().numpy())
            atomic_npy(labels_path, labels.to(torch.int64).numpy())
            splits[split] = {"shape": list(feats.shape), "dtype": "float16"}
        write_json(self.manifest_path, {"version": MANIFEST_VERSION, "key": key, "splits": splits, "info": info})
