"""An experiment's checkpoint files: where they live, RNG state capture, and reading the latest good one.

The schema (keys, version) is :mod:`models.schema`; every file is written by :func:`models.io.atomic_save`.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from models.io import CheckpointError, safe_load
from models.schema import check_training_checkpoint

log = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pth"
PREVIOUS = "checkpoint_previous.pth"


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
    """The latest checkpoint (automatic resume) and the previous one (its fallback)."""
    ckpt = os.path.join(exp_dir, "checkpoints")
    return {"latest": os.path.join(ckpt, LATEST), "previous": os.path.join(ckpt, PREVIOUS)}


def epoch_checkpoint_path(exp_dir: str, epoch: int) -> str:
    """The paper's name for a periodic checkpoint."""
    return os.path.join(exp_dir, "checkpoints", f"ckpt_epoch_{epoch}.pth")


def load_training_checkpoint(path: str) -> dict:
    """Read one of our training checkpoints safely and check it is one."""
    return check_training_checkpoint(safe_load(path, "checkpoint"), path)


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
