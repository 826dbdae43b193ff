"""Semantic-segmentation sets in the two public layouts, read as (image, label) pairs.

- **Pascal VOC 2012** (the ``VOC2012`` folder of ``VOCdevkit``): ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png`` (palette PNGs whose pixel values are the class indices: 0 background,
  1-20 the objects, 255 the unlabelled object borders), ``ImageSets/Segmentation/{train,val}.txt`` (one id
  a line). 21 classes.
- **ADE20K** (the ``ADEChallengeData2016`` folder): ``images/{training,validation}/<name>.jpg`` and
  ``annotations/{training,validation}/<name>.png`` (0 = "other", 1-150 the classes). As is standard the
  labels are shifted by one: 0 becomes 255 (ignored) and class k becomes k - 1, so 150 classes;
  ``objectInfo150.txt``, when present, gives their names.

A ``classes.txt`` at the root (one name a line, index order) overrides the class list (the demo set of
``python -m data.demo --seg`` has one). Every label value is checked: one that is neither a class index
nor 255 is an error naming the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.datasets import DataError

IGNORE = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
ADE_CLASSES = 150
SPLITS = {"voc": {"train": "train", "val": "val"}, "ade20k": {"train": "training", "val": "validation"}}


@dataclass(frozen=True)
class SegLayout:
    """Where a segmentation set's pairs are and how to read their labels."""

    name: str  # voc | ade20k
    root: str
    classes: tuple[str, ...]

    @property
    def shift(self) -> bool:
        """ADE20K: label 0 is "other" (ignored) and the classes start at 1."""
        return self.name == "ade20k"


def detect_layout(root: str) -> SegLayout:
    """The layout of ``root`` (VOC 2012 or ADE20K), or a DataError naming what each one needs."""
    if not os.path.isdir(root):
        raise DataError(f"segmentation data folder '{root}' does not exist; give the dataset root as DATA")
    if os.path.isdir(os.path.join(root, "VOC2012")) and not os.path.isdir(os.path.join(root, "JPEGImages")):
        raise DataError(f"'{root}' holds VOC2012/; give '{os.path.join(root, 'VOC2012')}' as DATA")
    voc = all(os.path.isdir(os.path.join(root, d)) for d in ("JPEGImages", "SegmentationClass"))
    ade = all(os.path.isdir(os.path.join(root, d)) for d in ("images", "annotations"))
    if voc:
        return SegLayout("voc", root, _class_names(root) or VOC_CLASSES)
    if ade:
        return SegLayout("ade20k", root, _class_names(root) or _ade_names(root))
    raise DataError(
        f"'{root}' is neither a Pascal VOC 2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) "
        "nor an ADE20K one (images/{training,validation}/, annotations/{training,validation}/)"
    )


def _class_names(root: str) -> tuple[str, ...] | None:
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not 1 <= len(names) <= IGNORE:
        raise DataError(f"'{path}' lists {len(names)} classes; give 1 to 255 names, one a line")
    return names


def _ade_names(root: str) -> tuple[str, ...]:
    """objectInfo150.txt's names (tab-separated, the name last), else class_1 ... class_150."""
    path = os.path.join(root, "objectInfo150.txt")
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        names = tuple(r[-1].split(",")[0].strip() for r in rows if len(r) >= 2)
        if len(names) == ADE_CLASSES:
            return names
    return tuple(f"class_{k}" for k in range(1, ADE_CLASSES + 1))


def list_pairs(layout: SegLayout, split: str) -> list[tuple[str, str]]:
    """(image path, label path) of ``split`` (train or val), sorted; a DataError for a missing file."""
    sub = SPLITS[layout.name][split]
    if layout.name == "voc":
        listing = os.path.join(layout.root, "ImageSets", "Segmentation", f"{sub}.txt")
        if not os.path.isfile(listing):
            raise DataError(f"VOC layout: '{listing}' does not exist; it lists the {split} image ids, one a line")
        with open(listing) as f:
            ids = sorted({line.strip() for line in f if line.strip()})
        pairs = [(os.path.join(layout.root, "JPEGImages", f"{i}.jpg"),
                  os.path.join(layout.root, "SegmentationClass", f"{i}.png")) for i in ids]  # fmt: skip
    else:
        images, labels = (os.path.join(layout.root, d, sub) for d in ("images", "annotations"))
        for folder in (images, labels):
            if not os.path.isdir(folder):
                raise DataError(f"ADE20K layout: '{folder}' does not exist; expected images/ and annotations/{sub}/")
        names = sorted(os.path.splitext(n)[0] for n in os.listdir(images) if n.lower().endswith((".jpg", ".png")))
        pairs = [(_image_file(images, n), os.path.join(labels, f"{n}.png")) for n in names]
    if not pairs:
        raise DataError(f"the {split} split of '{layout.root}' has no images")
    for image, label in pairs:
        for path in (image, label):
            if not os.path.isfile(path):
                raise DataError(f"'{path}' does not exist; every {split} image needs its label PNG (and vice versa)")
    return pairs


def _image_file(folder: str, name: str) -> str:
    jpg = os.path.join(folder, f"{name}.jpg")
    return jpg if os.path.isfile(jpg) else os.path.join(folder, f"{name}.png")


def read_label(path: str, layout: SegLayout) -> np.ndarray:
    """The label map (H, W) uint8: class indices 0..n-1 and 255 (ignored), after ADE20K's shift."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"label '{path}' is a {img.mode} image; labels are class indices (a palette or grey PNG), "
                    "not colours"
                )
            label = np.array(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"label '{path}' is unreadable ({exc}); replace or remove it") from exc
    if layout.shift:
        label = label - np.uint8(1)  # 0 -> 255 (uint8 wrap-around), k -> k - 1
    bad = label[(label >= len(layout.classes)) & (label != IGNORE)]
    if bad.size:
        raise DataError(
            f"label '{path}' holds class value {int(bad.max())}, but the {layout.name} layout has "
            f"{len(layout.classes)} classes (0-{len(layout.classes) - 1}, 255 ignored); check the file or classes.txt"
        )
    return label


def pairs_fingerprint(pairs: list[tuple[str, str]], root: str) -> dict:
    """Image count and SHA-256 of the relative paths (what a feature store is keyed by)."""
    rel = "\n".join(os.path.relpath(p, root).replace(os.sep, "/") for pair in pairs for p in pair)
    return {"n_images": len(pairs), "paths_sha256": hashlib.sha256(rel.encode()).hexdigest()}


class SegmentationSet(torch.utils.data.Dataset):
    """``(image uint8 (3, S, S), label uint8 (S, S), index)`` of one split, both resized to S x S.

    The whole image is resized (bilinear, antialiased; the aspect ratio is not kept), the label with
    nearest-neighbour so it keeps class indices. ``original_label(i)`` reads the label at its own size.
    """

    def __init__(self, layout: SegLayout, split: str, size: int) -> None:
        self.layout, self.split, self.size = layout, split, size
        self.pairs = list_pairs(layout, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, label_path = self.pairs[index]
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR, reducing_gap=None)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image '{image_path}' is unreadable ({exc}); replace or remove it") from exc
        label = Image.fromarray(read_label(label_path, self.layout)).resize((self.size, self.size), Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x, torch.from_numpy(np.asarray(label, dtype=np.uint8).copy()), index

    def original_label(self, index: int) -> np.ndarray:
        """The label of pair ``index`` at the image's own size (H, W), shifted as the layout says."""
        return read_label(self.pairs[index][1], self.layout)
