"""WebDataset shards read by index: sample i's bytes at a known offset of a known tar file.

A shard is a plain (uncompressed) tar file in WebDataset's layout: the members of one sample share a key
(``000000017.jpg``, ``000000017.cls``, ...; webdataset's own rule splits the key from the extension).
Beside every shard ``X.tar`` lies its index ``X.tar.index.npz``: for each sample with an image, the byte
offset and size of the image member, its label (``.cls``, else -1) and its name (the ``.path`` member that
``tools.make_shards`` writes: the image's path in the folder it came from; else the key). With it the
training loader reads any sample directly (one ``pread``), so a sample's crop stays a function of (seed,
epoch, index) as for a folder: exact resume mid-epoch, K-view cache rows and DDP equal to one process hold.

Shards are named by a brace pattern, ``shards/train-{000000..001023}.tar`` (expanded as the shell would,
in order). :func:`write_shards` writes them from any dataset's index in its order; :func:`index_shard`
indexes a shard written by another tool.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from braceexpand import braceexpand
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from data.datasets import IMG_EXTENSIONS, DataError, unreadable_reason
from data.index import ENCODING, SampleIndex, release_free_memory
from models.io import atomic_write

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.npz"
INDEX_FORMAT, INDEX_VERSION = "simreg shard index", 1
IMAGE_MEMBERS = tuple(e[1:] for e in IMG_EXTENSIONS)  # a sample's image: its first member with one of these
INDEX_HINT = "python -m tools.make_shards --index '{spec}'"


# ============ naming shards ============
def expand_spec(spec: str) -> list[str]:
    """The shard files a brace pattern names, in order (``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar)."""
    return list(braceexpand(spec))


def is_shard_spec(data: str) -> bool:
    """Whether a command's DATA names tar shards (one ``.tar`` file or a brace pattern of them), not a folder."""
    if os.path.isdir(data):
        return False
    return all(p.endswith(".tar") for p in expand_spec(data))


def index_path(shard: str) -> str:
    """``X.tar`` -> ``X.tar.index.npz``."""
    return shard + INDEX_SUFFIX


def shard_files(spec: str) -> list[str]:
    """The shards of ``spec``; a DataError when the pattern matches no file or misses some."""
    paths = expand_spec(spec)
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        where = f"'{paths[0]}' does not exist" + (f" (nor the {len(paths) - 1} others)" if len(paths) > 1 else "")
        raise DataError(f"no shard matches '{spec}': {where}; check the folder and the {{first..last}} range")
    if len(found) < len(paths):
        missing = next(p for p in paths if not os.path.isfile(p))
        raise DataError(
            f"shard '{missing}' of '{spec}' does not exist ({len(found)} of {len(paths)} found); "
            "check the {first..last} range"
        )
    return paths


# ============ the index of one shard ============
def _sample_fields(members: list[tarfile.TarInfo], read: Callable[[tarfile.TarInfo], bytes]) -> tuple | None:
    """(offset, size, label, name or None) of one sample's members; None when it has no image."""
    by_ext = {base_plus_ext(m.name)[1].lower(): m for m in members}
    image = next((m for m in members if base_plus_ext(m.name)[1].lower() in IMAGE_MEMBERS), None)
    if image is None:
        return None
    label = -1
    if "cls" in by_ext:
        text = read(by_ext["cls"]).decode(*ENCODING).strip()
        label = int(text) if text.lstrip("-").isdigit() else -1
    name = read(by_ext["path"]).decode(*ENCODING) if "path" in by_ext else None
    return image.offset_data, image.size, label, name


def _group_samples(tar: tarfile.TarFile):
    """Members grouped by key as webdataset groups them (consecutive members with the same key)."""
    group, key = [], None
    for member in tar:
        if not member.isfile():
            continue
        prefix, _ = base_plus_ext(member.name)
        if prefix is None:
            continue
        if group and prefix != key:
            yield key, group
            group = []
        key = prefix
        group.append(member)
    if group:
        yield key, group


def index_shard(shard: str, classes: list[str] | None = None) -> dict:
    """Index a tar shard: the arrays written to ``X.tar.index.npz`` (samples without an image are left out)."""
    offsets, sizes, labels, names, skipped = [], [], [], [], 0
    try:
        with tarfile.open(shard, "r:") as tar:

            def read(member: tarfile.TarInfo) -> bytes:
                return tar.extractfile(member).read()

            for key, members in _group_samples(tar):
                fields = _sample_fields(members, read)
                if fields is None:
                    skipped += 1
                    continue
                offsets.append(fields[0])
                sizes.append(fields[1])
                labels.append(fields[2])
                names.append(fields[3] if fields[3] is not None else key)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"shard '{shard}' is not a readable tar file ({exc}); re-create it") from exc
    if skipped:
        log.warning("shard %s: %d sample(s) without an image (%s) left out", shard, skipped, ", ".join(IMAGE_MEMBERS))
    index = SampleIndex.from_names(names, labels, classes or [])
    meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_bytes": os.path.getsize(shard)}
    return {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "classes": np.frombuffer(json.dumps(list(classes or [])).encode(), dtype=np.uint8),
        "names": index.blob,
        "starts": index.starts.astype(np.int64),
        "labels": index.labels,
        "offsets": np.asarray(offsets, dtype=np.int64),
        "sizes": np.asarray(sizes, dtype=np.int64),
    }


def write_index(shard: str, arrays: dict) -> None:
    """Write a shard's index beside it, atomically."""
    atomic_write(index_path(shard), lambda f: np.savez(f, **arrays))


def read_index(shard: str, spec: str) -> dict:
    """The index arrays of one shard (:func:`index_shard`'s); a DataError naming the fix when the index is
    missing, unreadable or older than the shard."""
    path, hint = index_path(shard), INDEX_HINT.format(spec=spec)
    if not os.path.isfile(path):
        raise DataError(f"shard '{shard}' has no index '{path}'; write it with {hint}")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in ("meta", "classes", "names", "starts", "labels", "offsets", "sizes")}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"shard index '{path}' is unreadable ({exc}); rewrite it with {hint}") from exc
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise DataError(f"'{path}' is not a shard index of this version; rewrite it with {hint}")
    if meta["tar_bytes"] != os.path.getsize(shard):
        raise DataError(
            f"shard '{shard}' changed since it was indexed ({os.path.getsize(shard)} bytes, the index says "
            f"{meta['tar_bytes']}); re-index it with {hint}"
        )
    return arrays


def _as_index(arrays: dict, classes: list[str]) -> SampleIndex:
    return SampleIndex(arrays["names"], arrays["starts"], arrays["labels"], classes)


# ============ reading samples ============
class ShardFiles:
    """Where a shard dataset's samples are: sample i at ``offsets[i]`` (``sizes[i]`` bytes) of its shard.

    Shard ``s`` holds samples ``bounds[s] .. bounds[s + 1] - 1``. Each process keeps at most
    ``open_files`` shards open (least recently used closed first); ``os.pread`` does not move a file
    position, so forked loader workers may share descriptors opened before the fork.
    """

    def __init__(
        self, shards: list[str], bounds: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, index: SampleIndex
    ) -> None:
        self.shards, self.bounds, self.offsets, self.sizes, self.index = shards, bounds, offsets, sizes, index
        self.open_files = 64
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self) -> dict:  # descriptors do not travel to a spawned process
        return {**self.__dict__, "_fds": OrderedDict()}

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right")) - 1

    def where(self, i: int) -> str:
        """Sample ``i`` for messages: its name and shard."""
        return f"'{self.index.name(i)}' in shard '{self.shards[self.shard_of(i)]}'"

    def read(self, i: int) -> bytes:
        """The image bytes of sample ``i``."""
        s = self.shard_of(i)
        fd = self._fds.pop(s, None)
        if fd is None:
            if len(self._fds) >= self.open_files:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.shards[s], os.O_RDONLY)
        self._fds[s] = fd
        size = int(self.sizes[i])
        data = os.pread(fd, size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"the shard ends after {len(data)} of the sample's {size} bytes")
        return data

    def open(self, i: int, opener: Callable):
        """Sample ``i`` decoded by ``opener(name, data)`` (``load_rgb`` or a fast decoder's ``open_image``)."""
        name = self.index.name(i)
        try:
            return opener(name, self.read(i))
        except (DataError, OSError) as exc:
            cause = unreadable_reason(exc.__cause__ or exc)
            raise DataError(
                f"cannot read image {self.where(i)} ({cause}); re-create that shard (python -m tools.make_shards)"
            ) from exc


def open_shards(spec: str) -> tuple[SampleIndex, ShardFiles]:
    """The index of every sample of the shards ``spec`` names, in order, and their reader."""
    shards = shard_files(spec)
    parts = [read_index(shard, spec) for shard in shards]
    for shard, part in zip(shards, parts, strict=True):  # one class list (compared as its JSON bytes)
        if not np.array_equal(part["classes"], parts[0]["classes"]):
            raise DataError(
                f"shard '{shard}' has another class list than '{shards[0]}'; give shards made from one dataset"
            )
    classes = json.loads(parts[0]["classes"].tobytes())
    index = SampleIndex.concat([_as_index(p, classes) for p in parts], classes)
    if not len(index):
        raise DataError(f"the shards '{spec}' hold no images ({', '.join(IMAGE_MEMBERS)} members)")
    bounds = np.concatenate([[0], np.cumsum([len(p["labels"]) for p in parts])]).astype(np.int64)
    offsets = np.concatenate([p["offsets"] for p in parts])
    largest = max(int(p["sizes"].max()) if len(p["sizes"]) else 0 for p in parts)
    sizes = np.concatenate([p["sizes"] for p in parts]).astype(np.uint32 if largest < 2**32 else np.int64)
    del parts
    release_free_memory()
    return index, ShardFiles(shards, bounds, offsets, sizes, index)


# ============ writing shards ============
def shard_name(out: str, prefix: str, s: int) -> str:
    return os.path.join(out, f"{prefix}-{s:06d}.tar")


def shard_spec(out: str, prefix: str, n_shards: int) -> str:
    """The brace pattern of ``n_shards`` shards written by :func:`write_shards`."""
    last = n_shards - 1
    return os.path.join(out, f"{prefix}-{{000000..{last:06d}}}.tar") if last else shard_name(out, prefix, 0)


def _member_ext(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if ext in IMAGE_MEMBERS else "jpg"


def _shard_done(path: str, index: SampleIndex, lo: int, hi: int) -> bool:
    """Whether ``path`` already holds samples ``lo .. hi - 1`` of ``index`` (a rerun skips it)."""
    if not (os.path.isfile(path) and os.path.isfile(index_path(path))):
        return False
    try:
        arrays = read_index(path, path)
    except DataError:
        return False
    done = _as_index(arrays, json.loads(arrays["classes"].tobytes()))
    want = SampleIndex.from_names([index.name(i) for i in range(lo, hi)], index.labels[lo:hi], index.classes)
    return done.fingerprint() == want.fingerprint() and np.array_equal(done.labels, want.labels)


def write_shard(path: str, read: Callable[[int], bytes], index: SampleIndex, lo: int, hi: int) -> None:
    """Samples ``lo .. hi - 1`` as one tar shard (key = the sample's number, 9 digits) and its index.

    Members are written in a fixed order with fixed metadata (mtime 0), so the same images give the same
    bytes. The tar is written to ``path.partial`` and renamed once its index is in place.
    """
    partial = path + ".partial"
    with open(partial, "wb") as f:
        with TarWriter(f, encoder=False, mtime=0) as tar:
            for i in range(lo, hi):
                name = index.name(i)
                sample = {"__key__": f"{i:09d}", _member_ext(name): read(i), "path": name.encode(*ENCODING)}
                if index.labelled:
                    sample["cls"] = str(index.label(i)).encode()
                tar.write(sample)
        f.flush()
        os.fsync(f.fileno())
    arrays = index_shard(partial, index.classes)
    write_index(path, arrays)
    os.replace(partial, path)


def write_shards(index: SampleIndex, read: Callable[[int], bytes], out: str, shard_size: int, prefix: str) -> str:
    """Every sample of ``index`` (bytes from ``read(i)``) into shards of ``shard_size`` samples, in index order;
    returns their brace pattern. Shards already written for these samples are kept (an interrupted run resumes).
    """
    os.makedirs(out, exist_ok=True)
    n_shards = -(-len(index) // shard_size)
    for s in range(n_shards):
        lo, hi = s * shard_size, min((s + 1) * shard_size, len(index))
        path = shard_name(out, prefix, s)
        if _shard_done(path, index, lo, hi):
            log.info("shard %d/%d: %s already written", s + 1, n_shards, path)
            continue
        write_shard(path, read, index, lo, hi)
        log.info("shard %d/%d: %s (%d images)", s + 1, n_shards, path, hi - lo)
    return shard_spec(out, prefix, n_shards)
