"""Datasets that return the sample index: image folders with class subsets, clear errors for bad input.

:class:`IndexedImages` serves the samples of a :class:`data.index.SampleIndex` wherever their bytes are
(files under a folder, or WebDataset shards: :mod:`data.shards`); :class:`IndexedImageFolder` is the
ImageFolder-style tree ``root/<class>/<image>``. :mod:`data.sources` turns a command's ``DATA`` into one.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.index import IndexBuilder, SampleIndex, release_free_memory
from models.errors import UserError

log = logging.getLogger(__name__)

SCAN_THREADS = 4  # folder listing threads (measured: about 30% less wall time than one on 2 busy cores)
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


def images_root(data: str) -> str:
    """Where a dataset root's training images are: ``data/train`` when it has one, else ``data`` itself."""
    train = os.path.join(data, "train")
    return train if os.path.isdir(train) else data


def dataset_fingerprint(dataset: IndexedImages) -> dict:
    """What identifies a dataset's content: image count, class names, SHA-256 of the relative paths.

    The one fingerprint of the project: resume identity, teacher cache manifests and feature stores
    all record it. Paths use ``/`` separators, so it does not depend on the operating system; labels
    follow from the paths and the class list. Shards made from a folder (``tools.make_shards``) record
    each sample's path, so they share the folder's fingerprint.
    """
    return dataset.index.fingerprint()


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
        return imagenet100_classes(list_class_folders(images_root(data_root)))
    if dataset == "imagenet-lt":  # the original accepted the name and used the folders as given
        log.info("--dataset imagenet-lt: every class folder of the data root, as given")
    return None


def list_class_folders(root: str) -> list[str]:
    """Sorted names of the class sub-folders of ``root`` (hidden folders skipped)."""
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' does not exist; check the data path")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(root: str, classes: Sequence[str] | None = None) -> SampleIndex:
    """The index of an ImageFolder-style tree ``root/<class>/.../<image>``: label = the class's position.

    Within a class the files are sorted by path; every image under the class folder counts (symbolic
    links followed, hidden files included), as torchvision's ImageFolder would find them. Names are
    relative to ``root`` with ``/`` separators.
    """
    found = list_class_folders(root)
    if not found:
        raise DataError(f"'{root}' has no class sub-folders; expected ImageFolder layout root/<class>/<image>")
    if classes is None:
        classes = found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"'{root}' lacks class folder(s) {missing[:5]} named in the class list")
    builder = IndexBuilder()
    # Listing folders waits on the kernel with the GIL released: a few threads overlap it (same order).
    pool = ThreadPoolExecutor(SCAN_THREADS)
    try:
        listed = pool.map(lambda cls: sorted(_files_under(root, cls)), classes)
        for label, (cls, files) in enumerate(zip(classes, listed, strict=True)):
            _add_class(builder, root, cls, files, label)
    finally:
        pool.shutdown(cancel_futures=True)  # an empty class folder stops the scan at once
    index = builder.build(classes)
    release_free_memory()
    return index


def _add_class(builder: IndexBuilder, root: str, cls: str, files: list[str], label: int) -> None:
    """Append one class folder's sorted files with its label; an empty class folder is an error."""
    if not files:
        raise DataError(
            f"class folder '{os.path.join(root, cls)}' holds no images ({', '.join(IMG_EXTENSIONS)}); "
            "remove it or add its images"
        )
    builder.add(files if os.sep == "/" else [f.replace(os.sep, "/") for f in files], label)


def _files_under(root: str, folder: str) -> list[str]:
    """Image files under ``root/folder`` as paths relative to ``root``: what ``os.walk(followlinks=True)``
    finds (folders it cannot list are skipped, as it skips them), without its per-file path arithmetic."""
    files, stack = [], [folder]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(rel + os.sep + entry.name)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                files.append(rel + os.sep + entry.name)
    return files


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Open any image as 3-channel RGB (grayscale, CMYK, RGBA and palette images are converted).

    ``data``: the file's bytes, already read (a shard's sample); ``path`` then only names it in errors.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, img).convert("RGB")
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        reason = unreadable_reason(exc) if data is not None else exc
        raise DataError(f"cannot read image '{path}' ({reason}); delete or replace the file") from exc


def unreadable_reason(exc: BaseException) -> str:
    """Why bytes are not an image, in words (PIL's own text for unknown data names a BytesIO object)."""
    return "not an image format PIL knows" if isinstance(exc, UnidentifiedImageError) else str(exc)


class SampleList(Sequence):
    """``(name, label)`` of every sample, read from a :class:`SampleIndex` (the list-like view of it)."""

    def __init__(self, index: SampleIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[str, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i %= len(self)
        return self.index.name(i), self.index.label(i)

    def __iter__(self):
        return iter(self.index)


class FolderFiles:
    """Where a folder dataset's samples are: ``root/<name>``, opened by the transform's loader."""

    def __init__(self, root: str, index: SampleIndex) -> None:
        self.root, self.index = root, index

    def where(self, i: int) -> str:
        """Sample ``i``'s file, for messages."""
        return os.path.join(self.root, self.index.name(i))

    def open(self, i: int, opener: Callable):
        return opener(os.path.join(self.root, self.index.name(i)))

    @property
    def fix(self) -> str:
        """What to do about an unreadable sample."""
        return "delete or replace the file"


class IndexedImages:
    """Images by index: ``dataset[key]`` is ``(transform(image, rng), label, index)``.

    The key may be an int or ``(index, epoch)`` (what :class:`data.loaders.EpochSampler` yields). The
    augmentation RNG is seeded from (seed, epoch, index), so a sample's crop depends on neither the
    worker nor the rank that loads it, nor on where its bytes are stored (a folder or shards): runs are
    reproducible and resume exactly. With ``epoch_period`` K the crops repeat every K epochs (epoch e
    draws those of epoch ((e - 1) mod K) + 1), as a teacher cache of K views needs. ``files`` opens
    sample i with the transform's ``loader`` when it has one (fast JPEG decoding, :mod:`data.decode`),
    else ``load_rgb``: :class:`FolderFiles`, or a shard reader (:mod:`data.shards`). The sample list is a
    :class:`SampleIndex` (numpy arrays, shared by forked loader workers); ``samples`` reads it as
    ``(name, label)`` pairs. ``skip_flag`` is the command's flag that sets ``skip_bad`` (training's
    ``--skip_bad_images``): an unreadable image's error suggests it only where it exists (evaluation,
    the caches and tools.embed need every image in its row).
    """

    def __init__(
        self,
        index: SampleIndex,
        files,
        root: str,
        transform: Callable | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        epoch_period: int | None = None,
        skip_flag: str | None = None,
    ) -> None:
        if not len(index):
            raise DataError(f"'{root}' holds no images")
        self.index, self.files, self.root = index, files, root
        self.classes = index.classes
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
        return len(self.index)

    @property
    def samples(self) -> SampleList:
        return SampleList(self.index)

    @property
    def targets(self) -> np.ndarray:
        """Labels (N,) int64 (-1: unlabelled)."""
        return self.index.labels.astype(np.int64)

    def rng(self, index: int, epoch: int) -> random.Random:
        """The augmentation RNG of ``index`` in ``epoch`` (a function of seed, epoch and index alone)."""
        if self.epoch_period and epoch > 0:
            epoch = (epoch - 1) % self.epoch_period + 1
        return random.Random(f"{self.seed}/{epoch}/{index}")

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        opener = getattr(self.transform, "loader", None) or load_rgb  # a transform may decode faster
        n = len(self.index)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                img = self.files.open(i, opener)
            except DataError as exc:
                if not self.skip_bad:
                    hint = f", or pass {self.skip_flag} to skip such files" if self.skip_flag else ""
                    raise DataError(f"{exc}{hint}") from None
                self._bad += 1
                log.warning("skipping unreadable image %s", self.files.where(i))
                continue
            # The replacement keeps its own index, so its label and cached target stay consistent.
            return (self.transform(img, self.rng(i, epoch)) if self.transform else img), self.index.label(i), i
        raise DataError(f"no image under '{self.root}' could be read")


class IndexedImageFolder(IndexedImages):
    """:class:`IndexedImages` of an ImageFolder-style tree ``root/<class>/<image>`` (``classes``: a subset,
    in label order; default every class folder, sorted)."""

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
        index = scan_class_folders(root, classes)
        super().__init__(index, FolderFiles(root, index), root, transform, seed, skip_bad, epoch_period, skip_flag)
