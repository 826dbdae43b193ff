"""Every image under a folder, in any layout: a sorted file list and a dataset over it.

``tools.embed`` computes features of a user's own images, and ``train_student.py`` distils on them, which
need not sit in ``<class>/<image>`` folders. :func:`scan_images` walks the tree (symbolic links followed,
hidden files and folders skipped) and sorts the relative paths, so the order does not depend on the file
system; the features file records this list, row i for file i.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from data.datasets import IMG_EXTENSIONS, DataError, FolderFiles, IndexedImages
from data.index import SampleIndex, release_free_memory


def scan_images(root: str) -> SampleIndex:
    """The unlabelled index of every image under ``root`` (``/``-separated relative paths, sorted)."""
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' does not exist; give the folder holding the images")
    found, stack = [], [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel) if rel else root))
        except OSError:  # a folder that cannot be listed is skipped, as os.walk skips it
            continue
        prefix = rel + "/" if rel else ""
        for entry in entries:
            if entry.name.startswith("."):  # .git, .ipynb_checkpoints, ...
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(prefix + entry.name)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                found.append(prefix + entry.name)
    if not found:
        raise DataError(f"'{root}' holds no images ({', '.join(IMG_EXTENSIONS)}) in any of its folders")
    found.sort()
    index = SampleIndex.from_names(found)
    del found
    release_free_memory()
    return index


def list_image_files(root: str) -> list[str]:
    """Relative paths (``/``-separated) of every image under ``root``, sorted; a DataError if there is none."""
    return scan_images(root).names()


class ImageFiles(IndexedImages):
    """``root``'s images as ``(transform(image), -1, index)``: the evaluation datasets' sample, without labels.

    ``files`` (relative paths) or ``index`` (a :class:`SampleIndex`) lists them; ``classes`` is empty, so
    the project's dataset fingerprint (:func:`data.datasets.dataset_fingerprint`) identifies the file list.
    An unreadable image is an error naming it: skipping it would shift every later row away from its file.
    """

    def __init__(
        self,
        root: str,
        files: Sequence[str] | None = None,
        transform: Callable | None = None,
        index: SampleIndex | None = None,
    ) -> None:
        index = index if index is not None else SampleIndex.from_names(list(files or []))
        super().__init__(index, FolderFiles(root, index), root, transform)
