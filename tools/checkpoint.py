"""Atomic checkpoint writing, the experiment's checkpoint files, RNG state capture and resume."""

from __future__ import annotations

import errno
import logging
import os
import random
import tempfile

import numpy as np
import torch

from models.errors import UserError
from models.formats import CheckpointError, safe_load

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LATEST = "checkpoint_latest.pth"
PREVIOUS = "checkpoint_previous.pth"


def atomic_write(path: str, write, keep_previous: str | None = None) -> None:
    """``write(file)`` into a temporary file in the same folder, fsync, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file. With
    ``keep_previous``, the file being replaced is first renamed there (the fallback if ``path`` is
    later found corrupt). A full disk raises a UserError and leaves the existing files untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=folder)
    try:
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


def atomic_save(obj: object, path: str, keep_previous: str | None = None) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), keep_previous)


def rng_state() -> dict:
    """Every RNG this process uses, in plain tensors and lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    inner, version, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(exp_dir: str) -> dict[str, str]:
    ckpt = os.path.join(exp_dir, "checkpoints")
    return {"dir": ckpt, "latest": os.path.join(ckpt, LATEST), "previous": os.path.join(ckpt, PREVIOUS)}


def epoch_checkpoint_path(exp_dir: str, epoch: int) -> str:
    """The paper's name for a periodic checkpoint."""
    return os.path.join(exp_dir, "checkpoints", f"ckpt_epoch_{epoch}.pth")


def load_training_checkpoint(path: str) -> dict:
    """Read one of our training checkpoints safely and check it is one."""
    ckpt = safe_load(path, "checkpoint")
    if not (isinstance(ckpt, dict) and "version" in ckpt and "student" in ckpt and "optimizer" in ckpt):
        raise CheckpointError(
            f"'{path}' is not a training checkpoint of this project (no version/student/optimizer); "
            "to start from other weights use --weights"
        )
    return ckpt


def load_latest_checkpoint(exp_dir: str) -> tuple[str, dict] | None:
    """The experiment's latest good training checkpoint, falling back to the previous one.

    Returns (path, checkpoint), or None when the experiment has none yet. A corrupt latest file is
    reported with a warning naming both files; if neither can be read, that is an error.
    """
    paths = checkpoint_paths(exp_dir)
    latest, previous = paths["latest"], paths["previous"]
    if not os.path.exists(latest) and not os.path.exists(previous):
        return None
    try:
        return latest, load_training_checkpoint(latest)
    except CheckpointError as exc:
        if not os.path.exists(previous):
            raise
        log.warning("latest checkpoint %s is unusable (%s); falling back to %s", latest, exc, previous)
        return previous, load_training_checkpoint(previous)
