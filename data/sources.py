"""A command's DATA in any of its three forms, as one indexed dataset (:class:`data.datasets.IndexedImages`).

- **class folders**: ``DATA/train/<class>/<image>`` (or ``DATA/<class>/<image>``): labels from the folders,
  the meaning and numbers this project always gave them;
- **a folder of images** in any other layout, flat or nested, with or without ``train/``: no labels
  (distillation needs none), every image under it in sorted path order;
- **WebDataset shards**: ``shards/train-{000000..001023}.tar`` with their index (:mod:`data.shards`).

``--layout auto`` tells the two folder forms apart: a folder (``DATA/train`` when it exists) whose
sub-folders exist is class folders, a folder without sub-folders is a folder of images; ``--layout images``
takes every image under a nested folder without labels, ``--layout classes`` insists on class folders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from data.datasets import (
    IMG_EXTENSIONS,
    DataError,
    FolderFiles,
    IndexedImageFolder,
    IndexedImages,
    images_root,
    select_classes,
)
from data.image_files import ImageFiles, scan_images
from data.shards import ShardFiles, is_shard_spec, open_shards

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "classes", "images")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def check_data(data: str) -> None:
    """A DataError, before any work, when DATA names neither a folder nor shards (one sentence each)."""
    if data.endswith(COMPRESSED) or data.rstrip("}").endswith(COMPRESSED):
        raise DataError(
            f"'{data}' names compressed tar files; shards are read by index and must be plain .tar files "
            "(JPEG bytes gain nothing from compression): write them with python -m tools.make_shards"
        )
    if is_shard_spec(data):
        return
    if not os.path.exists(data):
        raise DataError(
            f"data folder '{data}' does not exist; give the dataset root (a folder of images, or one holding "
            "train/), or shards as 'DIR/train-{000000..000099}.tar'"
        )
    if not os.path.isdir(data):
        raise DataError(f"DATA '{data}' is a file; give a folder of images or shards named '*.tar'")


def folder_layout(root: str, layout: str = "auto") -> str:
    """``classes`` or ``images``: how a folder's images are read (``auto``: class folders when it has sub-folders)."""
    if layout != "auto":
        return layout
    with os.scandir(root) as entries:
        has_folders = any(e.is_dir() and not e.name.startswith(".") for e in entries)
    return "classes" if has_folders else "images"


def open_images(
    data: str,
    transform: Callable | None = None,
    *,
    class_list: str | None = None,
    subset: str = "imagenet",
    layout: str = "auto",
    seed: int = 0,
    skip_bad: bool = False,
    skip_flag: str | None = None,
) -> IndexedImages:
    """The training images DATA names: class folders, a folder of images or shards (the module's docstring).

    ``class_list`` (a file) and ``subset`` ``imagenet100`` choose class folders, so they are refused for the
    other forms. Every user mistake (no such folder, no images, a pattern matching no shard, a shard without
    index) is a DataError naming the fix.
    """
    check_data(data)
    choosing = class_list is not None or subset == "imagenet100"
    if is_shard_spec(data):
        if choosing:
            raise DataError("--class_list and --dataset imagenet100 choose class folders; shards are used whole")
        index, files = open_shards(data)
        return IndexedImages(index, files, data, transform, seed, skip_bad, skip_flag=skip_flag)
    root = images_root(data)
    if folder_layout(root, layout) == "classes":
        classes = select_classes(data, class_list, subset)
        dataset = IndexedImageFolder(root, transform, classes, seed, skip_bad, skip_flag=skip_flag)
        _warn_loose_images(root)
        return dataset
    if choosing:
        raise DataError(
            f"--class_list and --dataset imagenet100 choose class folders, but '{root}' has no sub-folders; "
            "drop them to use every image"
        )
    index = scan_images(root)
    return IndexedImages(index, FolderFiles(root, index), root, transform, seed, skip_bad, skip_flag=skip_flag)


def open_image_files(data: str, transform: Callable | None = None) -> IndexedImages:
    """Every image DATA holds, without labels, for ``tools.embed``: all images under a folder (any layout,
    ``train/`` and ``val/`` alike, sorted by path) or every sample of shards, in order."""
    if is_shard_spec(data):
        index, files = open_shards(data)
        return IndexedImages(index, files, data, transform)
    if not os.path.isdir(data):
        what = "is a file" if os.path.exists(data) else "does not exist"
        raise DataError(f"image folder '{data}' {what}; give the folder holding the images (or shards '*.tar')")
    return ImageFiles(data, transform=transform, index=scan_images(data))


def _warn_loose_images(root: str) -> None:
    """Class folders: images lying directly in ``root`` belong to no class and are not used; say so."""
    with os.scandir(root) as entries:
        loose = sum(
            1
            for e in entries
            if not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS) and not e.is_dir()
        )
    if loose:
        log.warning(
            "%d image(s) directly in %s are in no class folder and are not used; move them into one, or pass "
            "--layout images to use every image without labels",
            loose,
            root,
        )


def describe(dataset: IndexedImages) -> str:
    """The data form for the log: ``1300 images in 2 class folders of DIR``, ``... (no labels) under DIR``,
    ``... in 8 shards DATA``."""
    n = f"{len(dataset):,} images"
    if isinstance(dataset.files, ShardFiles):
        labels = f", labels of {len(dataset.classes)} classes" if dataset.classes else ""
        return f"{n} in {len(dataset.files.shards)} shard(s) {dataset.root}{labels}"
    if dataset.classes:
        return f"{n} in {len(dataset.classes)} class folders of {dataset.root}"
    return f"{n} (no labels) under {dataset.root}"


def is_labelled(dataset: IndexedImages) -> bool:
    """Whether the samples carry class labels (what k-NN and the linear probe need)."""
    return bool(dataset.classes)
