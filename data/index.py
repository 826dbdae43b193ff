"""The sample index: N samples' names and labels in a few numpy arrays that forked loader workers share.

A Python list of ``(path, label)`` tuples costs about 150 bytes per sample, and every forked DataLoader
worker copies the pages of it that it reads (reading an object writes its reference count): at 14 million
images that is gigabytes per worker. Here a dataset of N samples is

- ``blob``: uint8 (B,), every name UTF-8 encoded and ``\\n``-joined (no trailing newline), which are
  exactly the bytes the dataset fingerprint hashes;
- ``starts``: (N + 1,) byte offsets, name i being ``blob[starts[i] : starts[i + 1] - 1]`` (uint32 while
  the blob is under 4 GiB, else int64);
- ``labels``: int32 (N,), -1 for a sample without a label;
- ``classes``: the class names (a short list).

Reading a name slices the arrays and decodes a few bytes: nothing shared is written, so the workers'
pages stay shared. Names are stored with ``surrogateescape``, so any file name the OS returns round-trips.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

ENCODING = ("utf-8", "surrogateescape")


class SampleIndex:
    """Names, labels and class names of N samples in numpy arrays (see the module's docstring)."""

    def __init__(self, blob: np.ndarray, starts: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(starts) != len(labels) + 1:
            raise ValueError(f"{len(starts)} name offsets for {len(labels)} labels")
        self.blob, self.starts, self.labels, self.classes = blob, starts, labels, list(classes)

    # ============ building ============
    @classmethod
    def from_names(
        cls, names: Sequence[str], labels: Sequence[int] | np.ndarray | None = None, classes: Sequence[str] = ()
    ) -> SampleIndex:
        """The index of ``names`` in this order (``labels`` None: every sample unlabelled, -1)."""
        builder = IndexBuilder()
        builder.add(names, -1 if labels is None else labels)
        return builder.build(classes)

    @classmethod
    def concat(cls, parts: Sequence[SampleIndex], classes: Sequence[str]) -> SampleIndex:
        """The samples of ``parts`` one after the other, under one class list (copied once into new arrays)."""
        parts = [p for p in parts if len(p)]
        total = sum(p.blob.nbytes for p in parts) + max(len(parts) - 1, 0)
        blob, n = np.full(total, ord("\n"), dtype=np.uint8), sum(len(p) for p in parts)
        starts = np.empty(n + 1, dtype=np.uint32 if total + 1 < 2**32 else np.int64)
        pos = row = 0
        for p in parts:
            blob[pos : pos + p.blob.nbytes] = p.blob
            starts[row : row + len(p)] = p.starts[:-1].astype(np.int64) + pos
            pos, row = pos + p.blob.nbytes + 1, row + len(p)
        starts[n] = pos if parts else 0
        labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32)
        return cls(blob, starts, labels.astype(np.int32, copy=False), classes)

    # ============ reading ============
    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        """Name of sample ``i`` (a path relative to the dataset root, or a shard sample's name)."""
        start, end = int(self.starts[i]), int(self.starts[i + 1]) - 1
        return self.blob[start:end].tobytes().decode(*ENCODING)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((self.name(i), self.label(i)) for i in range(len(self)))

    def names(self) -> list[str]:
        """Every name, in order (a Python list: for small datasets and one-off uses)."""
        return self.blob.tobytes().decode(*ENCODING).split("\n") if len(self) else []

    def name_sample(self, limit: int = 100_000) -> list[str]:
        """Every name when there are at most ``limit``, else ``limit`` names evenly spaced over the index."""
        if len(self) <= limit:
            return self.names()
        return [self.name(int(i)) for i in np.linspace(0, len(self) - 1, limit).astype(np.int64)]

    @property
    def labelled(self) -> bool:
        """Whether the samples carry class labels (class folders, or shards made from them)."""
        return bool(self.classes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return self.blob.nbytes + self.starts.nbytes + self.labels.nbytes

    def fingerprint(self) -> dict:
        """Image count, class names and SHA-256 of the ``\\n``-joined names (data.datasets.dataset_fingerprint)."""
        return {
            "n_images": len(self),
            "classes": list(self.classes),
            "paths_sha256": hashlib.sha256(self.blob).hexdigest(),
        }


class IndexBuilder:
    """Collects names chunk by chunk (a class folder, a shard) without holding them all as Python strings."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lengths: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, names: Sequence[str], labels: int | Sequence[int] | np.ndarray) -> None:
        """Append ``names`` with their labels (one int: the same label for all)."""
        if not names:
            return
        text = "\n".join(names)
        if text.isascii():  # one byte per character: the lengths need no encoding
            lengths = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
            data = text.encode("ascii")
        else:
            encoded = [n.encode(*ENCODING) for n in names]
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(names))
            data = b"\n".join(encoded)
        self.add_encoded(data, lengths, labels)

    def add_encoded(self, data: bytes, lengths: np.ndarray, labels: int | Sequence[int] | np.ndarray) -> None:
        """Append names already encoded and ``\\n``-joined, with their byte lengths."""
        if len(lengths) == 0:
            return
        self.chunks.append(data)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        if isinstance(labels, (int, np.integer)):
            self.labels.append(np.full(len(lengths), labels, dtype=np.int32))
        else:
            self.labels.append(np.asarray(labels, dtype=np.int32))

    def build(self, classes: Sequence[str] = ()) -> SampleIndex:
        blob = np.frombuffer(b"\n".join(self.chunks), dtype=np.uint8)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        dtype = np.uint32 if blob.nbytes + 1 < 2**32 else np.int64
        starts = np.zeros(len(lengths) + 1, dtype=dtype)
        np.cumsum(lengths + 1, out=starts[1:], dtype=dtype)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)
        self.chunks, self.lengths, self.labels = [], [], []
        return SampleIndex(blob, starts, labels, classes)


def release_free_memory() -> None:
    """Hand memory freed while building an index back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed heap pages for reuse, so the transient buffers of a 14M-sample build (the per-shard
    arrays, the scanned names) would stay in the main process's resident memory, about 1 GB (measured).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
