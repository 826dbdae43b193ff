"""Every image under a folder, in any layout: a sorted file list and a dataset over it.

``tools.embed`` computes features of a user's own images, which need not sit in ``<class>/<image>``
folders. :func:`list_image_files` walks the tree (symbolic links followed, hidden files and folders
skipped) and sorts the relative paths, so the order does not depend on the file system; the
features file records this list, row i for file i.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from data.datasets import IMG_EXTENSIONS, DataError, load_rgb


def list_image_files(root: str) -> list[str]:
    """Relative paths (``/``-separated) of every image under ``root``, sorted; a DataError if there is none."""
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' does not exist; give the folder holding the images")
    found = []
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        rel = os.path.relpath(dirpath, root)
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                found.append(name if rel == "." else os.path.join(rel, name).replace(os.sep, "/"))
    if not found:
        raise DataError(f"'{root}' holds no images ({', '.join(IMG_EXTENSIONS)}) in any of its folders")
    return sorted(found)


class ImageFiles:
    """``root``'s images as ``(transform(image), -1, index)``: the evaluation datasets' sample, without labels.

    ``samples`` holds ``(relative path, -1)`` and ``classes`` is empty, so the project's dataset
    fingerprint (:func:`data.datasets.dataset_fingerprint`) identifies the file list. An unreadable
    image is an error naming it: skipping it would shift every later row away from its file.
    """

    def __init__(self, root: str, files: Sequence[str], transform: Callable | None = None) -> None:
        self.root = root
        self.samples = [(path, -1) for path in files]
        self.classes: list[str] = []
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [-1] * len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index = key[0] if isinstance(key, tuple) else key  # the cache builder's keys are (index, view)
        opener = getattr(self.transform, "loader", None) or load_rgb
        img = opener(os.path.join(self.root, self.samples[index][0]))
        return (self.transform(img, None) if self.transform else img), -1, index
