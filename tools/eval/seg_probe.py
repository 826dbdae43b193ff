"""The linear segmentation probe (the dense evaluation of DINOv2 and RADIO) on cached feature maps.

Protocol: the backbone is frozen; each image is resized whole to S x S and its last feature map
(B, C, h, w) (:mod:`models.feature_maps`, as the dense objective reads it) is computed once and stored as
float16. A classifier of one BatchNorm2d (optional, as DINOv2's linear head has) and one 1x1 convolution
maps it to class logits (B, K, h, w), bilinearly upsampled to the label size: S x S for the training
cross-entropy (label 255 ignored), each val image's own size for the scores. A 1x1 convolution commutes
with bilinear upsampling (both are linear and the interpolation weights sum to one), so this is the 1x1
classifier on the bilinearly upsampled feature map, at a fraction of the cost. Scores: the mean over
classes of intersection over union (classes absent from both prediction and labels left out) and the
pixel accuracy, from one confusion matrix over every val pixel that is not 255.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.segmentation import IGNORE, SegLayout, SegmentationSet, detect_layout, pairs_fingerprint
from models.backbones import innermost_encoder
from models.feature_maps import MapTap
from models.io import differences, read_json, write_json
from models.simreg import fp32_or_wider
from models.vit import check_patch_multiple
from tools.engine.step import autocast

log = logging.getLogger(__name__)

MANIFEST = "seg_features.json"


# ---------------------------------------------------------------- scores
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n, n) int64 counts, row = true class, column = predicted, over the pixels whose label is not 255."""
    keep = label != IGNORE
    index = label[keep].long() * n_classes + pred[keep].long()
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes).cpu()


def scores(conf: torch.Tensor, names: tuple[str, ...]) -> dict:
    """mIoU and pixel accuracy (%) of a confusion matrix; per-class IoU, None where a class appears nowhere."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [float(t / u * 100) if u > 0 else None for t, u in zip(tp, union, strict=True)]
    present = [v for v in iou if v is not None]
    return {
        "miou": sum(present) / len(present) if present else 0.0,
        "pixel_acc": float(tp.sum() / conf.sum().clamp(min=1) * 100),
        "per_class_iou": dict(zip(names, iou, strict=True)),
        "classes_scored": len(present),
    }


# ---------------------------------------------------------------- the classifier
class SegProbe(nn.Module):
    """Feature maps (B, C, h, w) -> logits (B, K, H, W): [BatchNorm2d(C)] -> Conv2d(C, K, 1) -> bilinear to (H, W)."""

    def __init__(self, channels: int, n_classes: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.conv = nn.Conv2d(channels, n_classes, 1)

    def forward(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(self.bn(maps.float()))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- cached maps
class MapStore:
    """``<split>_maps.npy`` float16 (N, C, h, w) and ``<split>_labels.npy`` uint8 (N, S, S) in a folder, with a
    manifest keyed like :class:`tools.eval.features.FeatureStore`: maps are reused only while the network,
    the preprocessing and the images are the same. Arrays are written under ``.partial`` names and renamed,
    the manifest last, so an interrupted extraction never looks finished."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def paths(self, split: str) -> tuple[str, str]:
        return os.path.join(self.folder, f"{split}_maps.npy"), os.path.join(self.folder, f"{split}_labels.npy")

    def entry(self, key: dict, split: str) -> dict | None:
        """The stored split's record when its key matches (None: absent or stale)."""
        manifest = read_json(os.path.join(self.folder, MANIFEST)) or {}
        entry = manifest.get("splits", {}).get(split)
        if entry is None or not all(os.path.isfile(p) for p in self.paths(split)):
            return None
        diffs = differences(entry.get("key", {}), key)
        if diffs:
            log.warning("stored %s maps in %s are stale (%s); recomputing", split, self.folder, "; ".join(diffs[:3]))
            return None
        return entry

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        maps, labels = (np.load(p, mmap_mode="r") for p in self.paths(split))
        return maps, labels

    def record(self, key: dict, split: str, shape: list[int]) -> None:
        path = os.path.join(self.folder, MANIFEST)
        manifest = read_json(path) or {"splits": {}}
        manifest["splits"][split] = {"key": key, "shape": shape, "dtype": "float16"}
        write_json(path, manifest)


@torch.no_grad()
def extract_maps(
    model: nn.Module, dataset: SegmentationSet, store: MapStore, key: dict, *, batch_size: int, workers: int,
    device: torch.device, amp_dtype: torch.dtype | None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The split's maps (N, C, h, w) float16 and labels (N, S, S) uint8, memory-mapped from ``store``
    (computed once: written batch by batch, so a large set never sits in memory)."""
    split = dataset.split
    if store.entry(key, split) is not None:
        log.info("reusing the %s feature maps in %s", split, store.folder)
        return store.load(split)
    encoder = innermost_encoder(model).eval()
    tap = MapTap(encoder.backbone, name=getattr(model, "arch", ""))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    os.makedirs(store.folder, exist_ok=True)
    maps_path, labels_path = store.paths(split)
    maps = labels = None
    start, n = time.perf_counter(), len(dataset)
    for images, label, index in tqdm(loader, desc=f"{split} maps", leave=False, disable=None):
        x = images.to(device, non_blocking=True).float().div_(255.0)
        tap.start()
        with autocast(device, amp_dtype):
            encoder(x)
        fmap = fp32_or_wider(tap.read()).to(torch.float16).cpu().numpy()
        if maps is None:
            maps = np.lib.format.open_memmap(maps_path + ".partial", "w+", np.float16, (n, *fmap.shape[1:]))
            labels = np.lib.format.open_memmap(labels_path + ".partial", "w+", np.uint8, (n, *label.shape[1:]))
        maps[index.numpy()] = fmap
        labels[index.numpy()] = label.numpy()
    shape = list(maps.shape)
    maps.flush()
    labels.flush()
    del maps, labels
    os.replace(maps_path + ".partial", maps_path)
    os.replace(labels_path + ".partial", labels_path)
    store.record(key, split, shape)
    log.info("%s feature maps %s computed in %.1f s", split, tuple(shape), time.perf_counter() - start)
    return store.load(split)


# ---------------------------------------------------------------- training and evaluation
def batches(maps: np.ndarray, labels: np.ndarray, order: np.ndarray, batch: int, device: torch.device):
    """(maps (B, C, h, w) float32, labels (B, S, S) int64) on ``device``, batch by batch in ``order``."""
    for start in range(0, len(order), batch):
        rows = np.sort(order[start : start + batch])  # sorted: one forward pass over the mapped file
        yield (torch.from_numpy(maps[rows].astype(np.float32)).to(device),
               torch.from_numpy(labels[rows].astype(np.int64)).to(device))  # fmt: skip


def train_probe(
    probe: SegProbe, maps: np.ndarray, labels: np.ndarray, *, epochs: int, batch_size: int, lr: float,
    weight_decay: float, seed: int, device: torch.device,
) -> list[float]:  # fmt: skip
    """AdamW with a cosine schedule over all iterations; the cross-entropy ignores label 255. Returns the mean
    training loss of each epoch."""
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(maps) / batch_size)
    total, step, history = epochs * steps_per_epoch, 0, []
    size = tuple(labels.shape[1:])
    for epoch in range(1, epochs + 1):
        probe.train()
        order = np.random.RandomState(seed * 100_003 + epoch).permutation(len(maps))
        losses = []
        for x, y in batches(maps, labels, order, batch_size, device):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x, size), y, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        history.append(sum(losses) / len(losses))
        log.info("epoch %d/%d: loss %.4f", epoch, epochs, history[-1])
    return history


@torch.no_grad()
def evaluate_probe(probe: SegProbe, maps: np.ndarray, dataset: SegmentationSet, device: torch.device) -> torch.Tensor:
    """The val confusion matrix, each image's logits upsampled to its own label size."""
    probe.eval()
    n_classes = probe.conv.out_channels
    conf = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    for i in range(len(dataset)):
        label = torch.from_numpy(dataset.original_label(i)).to(device)
        x = torch.from_numpy(maps[i : i + 1].astype(np.float32)).to(device)
        pred = probe(x, tuple(label.shape)).argmax(dim=1)[0]
        conf += confusion_matrix(pred, label, n_classes)
    return conf


# ---------------------------------------------------------------- the whole protocol
@dataclass(frozen=True)
class ProbeSettings:
    """The probe's protocol (``eval_seg.py``'s defaults)."""

    image_size: int = 448
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batchnorm: bool = True
    seed: int = 0
    extract_batch: int = 32
    workers: int = 0

    def protocol(self, layout: SegLayout) -> dict:
        """The protocol in words, as ``seg_results.json`` records it."""
        s = self.image_size
        return {
            "probe": ("BatchNorm2d + " if self.batchnorm else "") + "1x1 convolution on the frozen last feature map",
            "input": f"the whole image resized to {s} x {s} (bilinear; aspect not kept)",
            "training": f"cross-entropy (255 ignored) at {s} x {s} labels (nearest), AdamW lr {self.lr} cosine, "
            f"weight decay {self.weight_decay}, batch {self.batch_size}, {self.epochs} epochs, seed {self.seed}",
            "scores": "val logits bilinearly upsampled to each image's own size; mIoU over the classes present in "
            "labels or predictions; pixel accuracy over the non-ignored pixels",
            "layout": layout.name,
            "classes": len(layout.classes),
        }


def segmentation_probe(
    model: nn.Module, data: str, store_dir: str, settings: ProbeSettings, device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[dict, SegProbe]:  # fmt: skip
    """The linear segmentation probe of ``model`` (an :class:`models.pretrained.EvalModel`) on the VOC or
    ADE20K folder ``data``: maps stored in ``store_dir`` (reused while current), the probe trained and scored.
    Returns (the results: mIoU, pixel accuracy, per-class IoU, protocol, ...; the trained probe)."""
    layout = detect_layout(data)
    sets = {split: SegmentationSet(layout, split, settings.image_size) for split in ("train", "val")}
    backbone = innermost_encoder(model).backbone
    patch = getattr(backbone, "patch", None) or getattr(backbone, "patch_size", None)
    if isinstance(patch, int):  # a ViT: the patch size must divide the image size
        check_patch_multiple(settings.image_size, settings.image_size, patch, "--image_size")
    log.info("%s layout, %d classes: %d train and %d val images at %d px", layout.name, len(layout.classes),
             len(sets["train"]), len(sets["val"]), settings.image_size)  # fmt: skip
    store, ident, maps = MapStore(store_dir), model.identity, {}
    for split, dataset in sets.items():
        key = {"model": {k: ident.get(k) for k in ("kind", "weights_sha256", "format", "arch", "pool")},
               "image_size": settings.image_size, "autocast": str(amp_dtype or "float32"), "layout": layout.name,
               "root": os.path.abspath(layout.root), "data": pairs_fingerprint(dataset.pairs, layout.root)}  # fmt: skip
        maps[split] = extract_maps(model, dataset, store, key, batch_size=settings.extract_batch,
                                   workers=settings.workers, device=device, amp_dtype=amp_dtype)  # fmt: skip
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # here: extracting (or not) the maps draws from the generator
    probe = SegProbe(maps["train"][0].shape[1], len(layout.classes), settings.batchnorm).to(device)
    losses = train_probe(probe, *maps["train"], epochs=settings.epochs, batch_size=settings.batch_size,
                         lr=settings.lr, weight_decay=settings.weight_decay, seed=settings.seed,
                         device=device)  # fmt: skip
    result = scores(evaluate_probe(probe, maps["val"][0], sets["val"], device), layout.classes)
    result.update(protocol=settings.protocol(layout), feature_map=list(maps["train"][0].shape[1:]),
                  train_losses=losses, model=ident, probe_s=round(time.perf_counter() - start, 1))  # fmt: skip
    return result, probe
