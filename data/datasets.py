"""Image folders that return the sample index, with class subsets and clear errors for bad input."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.errors import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(UserError):
    """A dataset problem, with a message naming the path and the fix."""


def split_folder(root: str, split: str) -> str:
    """``root/split``, or a DataError naming what is missing (the dataset root, or its split folder)."""
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist; give the dataset root as the first argument")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"data folder '{root}' has no {split}/ sub-folder; expected {root}/{split}/<class>/<image>")
    return folder


def dataset_fingerprint(dataset: IndexedImageFolder) -> dict:
    """What identifies a dataset's content: image count, class names, SHA-256 of the relative paths.

    The one fingerprint of the project: resume identity, teacher cache manifests and feature stores
    all record it. Paths use ``/`` separators, so it does not depend on the operating system; labels
    follow from the paths and the class list.
    """
    rel = "\n".join(path.replace(os.sep, "/") for path, _ in dataset.samples)
    return {
        "n_images": len(dataset.samples),
        "classes": list(dataset.classes),
        "paths_sha256": hashlib.sha256(rel.encode()).hexdigest(),
    }


def imagenet100_classes(all_classes: Sequence[str]) -> list[str]:
    """The ImageNet-100 subset of the original release, as a rule on the sorted class folders.

    The original drew ``np.random.seed(1234); np.random.permutation(n)[:100]`` over the sorted class
    list and kept those classes (relabelled in sorted order); this reproduces that draw exactly.
    """
    classes = sorted(all_classes)
    if len(classes) < 100:
        raise DataError(f"--dataset imagenet100 needs at least 100 class folders, found {len(classes)}")
    picked = np.random.RandomState(1234).permutation(len(classes))[:100]
    return sorted(classes[i] for i in picked)


def read_class_list(path: str) -> list[str]:
    """Class folder names, one per line (blank lines and # comments ignored)."""
    if not os.path.isfile(path):
        raise DataError(f"class list file '{path}' does not exist; check --class_list")
    with open(path) as f:
        names = [ln.split("#")[0].strip() for ln in f]
    return [n for n in names if n]


def select_classes(data_root: str, class_list: str | None = None, dataset: str = "imagenet") -> list[str] | None:
    """The class folders a run uses: ``class_list`` (a file), the ImageNet-100 draw, or None for all."""
    if class_list:
        return read_class_list(class_list)
    if dataset == "imagenet100":
        return imagenet100_classes(list_class_folders(os.path.join(data_root, "train")))
    if dataset == "imagenet-lt":  # the original accepted the name and used the folders as given
        log.info("--dataset imagenet-lt: every class folder of the data root, as given")
    return None


def list_class_folders(root: str) -> list[str]:
    """Sorted names of the class sub-folders of ``root`` (hidden folders skipped)."""
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' does not exist; check the data path")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to root, label)]) of an ImageFolder-style tree, sorted."""
    found = list_class_folders(root)
    if not found:
        raise DataError(f"'{root}' has no class sub-folders; expected ImageFolder layout root/<class>/<image>")
    if classes is None:
        classes = found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"'{root}' lacks class folder(s) {missing[:5]} named in the class list")
    samples = []
    for label, cls in enumerate(classes):
        files = []
        for dirpath, _, names in os.walk(os.path.join(root, cls), followlinks=True):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            raise DataError(
                f"class folder '{os.path.join(root, cls)}' holds no images ({', '.join(IMG_EXTENSIONS)}); "
                "remove it or add its images"
            )
        samples += [(os.path.relpath(p, root), label) for p in sorted(files)]
    return list(classes), samples


def load_rgb(path: str) -> Image.Image:
    """Open any image as 3-channel RGB (grayscale, CMYK, RGBA and palette images are converted)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, img).convert("RGB")
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image '{path}' ({exc}); delete or replace the file") from exc


class IndexedImageFolder:
    """ImageFolder that returns ``(transform(image, rng), label, index)``.

    The key may be an int or ``(index, epoch)`` (what :class:`data.loaders.EpochSampler` yields). The
    augmentation RNG is seeded from (seed, epoch, index), so a sample's crop depends on neither the
    worker nor the rank that loads it: runs are reproducible and resume exactly. With ``epoch_period``
    K the crops repeat every K epochs (epoch e draws those of epoch ((e - 1) mod K) + 1), as a teacher
    cache of K views needs. Files are opened by ``transform.loader`` when the transform has one (fast
    JPEG decoding, :mod:`data.decode`), else ``load_rgb``. ``skip_flag`` is the command's flag that sets
    ``skip_bad`` (training's ``--skip_bad_images``): an unreadable image's error suggests it only where it
    exists (evaluation and the caches need every image in its row, so they have none).
    """

    def __init__(
        self,
        root: str,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        epoch_period: int | None = None,
        skip_flag: str | None = None,
    ) -> None:
        self.root = root
        self.classes, self.samples = scan_image_folder(root, classes)
        if not self.samples:
            raise DataError(f"'{root}' holds no images")
        self.transform = transform
        self.seed = seed
        self.skip_bad, self.skip_flag = skip_bad, skip_flag
        self.epoch_period = epoch_period
        # Shared with the loader's worker processes, which count the images they had to skip.
        self._bad = torch.zeros(1, dtype=torch.int64).share_memory_()

    def bad_images_seen(self) -> int:
        """How many unreadable images were replaced so far (with ``skip_bad``)."""
        return int(self._bad[0])

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def rng(self, index: int, epoch: int) -> random.Random:
        """The augmentation RNG of ``index`` in ``epoch`` (a function of seed, epoch and index alone)."""
        if self.epoch_period and epoch > 0:
            epoch = (epoch - 1) % self.epoch_period + 1
        return random.Random(f"{self.seed}/{epoch}/{index}")

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        opener = getattr(self.transform, "loader", None) or load_rgb  # a transform may decode faster
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            rel, label = self.samples[i]
            try:
                img = opener(os.path.join(self.root, rel))
            except DataError as exc:
                if not self.skip_bad:
                    hint = f", or pass {self.skip_flag} to skip such files" if self.skip_flag else ""
                    raise DataError(f"{exc}{hint}") from None
                self._bad += 1
                log.warning("skipping unreadable image %s", os.path.join(self.root, rel))
                continue
            # The replacement keeps its own index, so its label and cached target stay consistent.
            return (self.transform(img, self.rng(i, epoch)) if self.transform else img), label, i
        raise DataError(f"no image under '{self.root}' could be read")
