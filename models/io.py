"""Reading and writing files safely: the one checkpoint reader and the one atomic writer.

Reading: every checkpoint goes through :func:`safe_load` (``torch.load(weights_only=True)`` with an
explicit allow-list), so a file that needs arbitrary code to unpickle is refused, never run;
:func:`load_strict` loads a state dict with every key accounted for.
Writing: every file the project writes (checkpoints, caches, features, manifests, JSON results, stamp
files) goes through :func:`atomic_write`: a temporary file in the same folder, fsync, then a rename,
so a crash leaves the old file or the new one, never half of one.

Ground floor: used by ``models/``, ``data/`` and ``tools/`` alike.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from typing import IO

import numpy as np
import torch

from models.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used, with a message that names the file and the fix."""


# Old formats pickled an argparse.Namespace of their options: allowed by name, nothing else is.
SAFE_GLOBALS = [argparse.Namespace]


# ---------------------------------------------------------------- reading
def file_sha256(path: str, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB blocks); of a Hugging Face snapshot folder, the files it reads."""
    if os.path.isdir(path):  # models/hf_checkpoints.py: config, preprocessing and weights files together
        from models.hf_checkpoints import snapshot_sha256

        return snapshot_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: BaseException, width: int = 120) -> str:
    """The first sentence of ``exc``'s message, without terminal escape codes, cut at a word near ``width``."""
    text = ANSI.sub("", str(exc)).strip()
    if not text:
        return type(exc).__name__
    text = text.splitlines()[0].split(". ")[0].rstrip(".")
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."


def _pickled_class(exc: BaseException) -> str | None:
    """The class a refused pickle needs (``GLOBAL torch.nn.modules.linear.Linear`` in torch's message)."""
    found = re.search(r"GLOBAL ([\w.]+)", ANSI.sub("", str(exc)))
    return found.group(1) if found else None


def check_file(path: str | None, what: str) -> None:
    """A CheckpointError unless ``path`` names an existing file."""
    if not path:
        raise CheckpointError(f"no {what} file was given")
    if not os.path.exists(path):
        raise CheckpointError(f"{what} file '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} path '{path}' is a folder; give the checkpoint file itself")


def safe_load(path: str, what: str = "checkpoint") -> object:
    """Read a PyTorch (or safetensors) file onto the CPU without running code, or raise a CheckpointError.

    A safetensors file is recognised by its ``.safetensors`` name or by its header (any name).
    """
    check_file(path, what)
    if is_safetensors(path):
        return _load_safetensors(path, what)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # a broken pickle stream, not a forbidden class
            raise CheckpointError(_unreadable(what, path, exc)) from exc
        needs = _pickled_class(exc)
        what_it_is = f"a pickled {needs} object" if needs else "a pickle of Python objects"
        raise CheckpointError(
            f"refused to load {what} '{path}': it is {what_it_is}, and loading one needs arbitrary code to run; "
            "where you trust the file, re-save its weights with torch.save(model.state_dict(), path) and give that"
        ) from exc
    except Exception as exc:  # whatever the parser trips on, the file is not a readable checkpoint
        raise CheckpointError(_unreadable(what, path, exc)) from exc


def _unreadable(what: str, path: str, exc: BaseException) -> str:
    return (
        f"{what} '{path}' is not a readable PyTorch checkpoint, perhaps cut short or damaged ({_first_line(exc)}); "
        "copy or download it again, or check that it is the right file"
    )


def is_safetensors(path: str) -> bool:
    """A safetensors file: by its ``.safetensors`` name, or under another name by its 8-byte little-endian
    header length followed by its JSON header."""
    if path.endswith(".safetensors"):
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _load_safetensors(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(f"{what} '{path}' is a safetensors file: pip install safetensors") from exc
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{what} '{path}' is not a readable safetensors file: {_first_line(exc)}") from exc


def _show(keys: list[str], n: int = 8) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(
    module: torch.nn.Module, sd: dict[str, torch.Tensor], path: str, what: str, assign: bool = False
) -> None:
    """Load ``sd`` into ``module`` with every key accounted for, or raise a CheckpointError naming them.

    Only BatchNorm's ``num_batches_tracked`` counters may be absent (converters from TensorFlow/JAX do
    not write them; eval-mode BatchNorm never reads them): they are filled with 0. ``assign=True``
    adopts the file's tensors (as float32) instead of copying, for networks built on the meta device.
    """
    own = module.state_dict()
    sd = dict(sd)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(f"{what} weights in '{path}' are missing {len(missing)} key(s): {_show(missing)}")
    if unexpected:
        raise CheckpointError(
            f"{what} weights in '{path}' have {len(unexpected)} unexpected key(s): {_show(unexpected)}"
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{what} weights in '{path}' do not fit the network (file vs network): {_show(bad, 4)}")
    if assign:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=assign)


# ---------------------------------------------------------------- writing
def atomic_write(path: str, write: Callable[[IO[bytes]], object], keep_previous: str | None = None) -> None:
    """``write(file)`` into a temporary file in the same folder, fsync, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file. With
    ``keep_previous``, the file being replaced is first renamed there (the fallback if ``path`` is
    later found corrupt). A full disk raises a UserError and leaves the existing files untouched.
    The file gets the mode ``open()`` would give it (0666 less the user's umask), not the temporary
    file's private 0600, so teammates and serving processes read what the umask lets them read.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no space left on the device while writing '{path}'; the previous file is intact - "
                "free some space and rerun the same command to resume"
            ) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    """This process's umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: object, path: str, keep_previous: str | None = None) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), keep_previous)


def atomic_npy(path: str, array: np.ndarray) -> None:
    """``np.save(array)`` to ``path`` atomically."""
    atomic_write(path, lambda f: np.save(f, array))


def write_json(path: str, obj: object) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str) -> object | None:
    """The JSON in ``path``, or None when it is absent or unreadable (a stamp or manifest to redo)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every (nested) entry that differs between two recorded dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return diffs


def _short(value: object, width: int = 48) -> str:
    """``value`` as text, cut to ``width`` characters (hashes and fingerprints) with '...' when cut."""
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."
