"""This project's training checkpoint: its keys and version, in one place.

Written by ``tools/engine/run_state.py`` (``checkpoint_latest.pth``, ``ckpt_epoch_<N>.pth``), read back
for resume there, and read as a student or teacher by ``models/formats.py`` (format ``simreg``).
A plain dict of tensors, numbers and strings, so ``torch.load(weights_only=True)`` reads it:

- ``version``: :data:`CHECKPOINT_VERSION`;
- ``epoch``: epochs fully done; ``progress``: the partial epoch after them (None at an epoch end);
- ``identity``: what defines the run (data fingerprint, teacher, student), checked on resume;
- ``args``: the run's arguments as a dict;
- ``student``: backbone weights with torchvision's (or timm's) names, no classifier;
- ``head``: the prediction head, paper indices ``0, 1, 3, 4, 5, 7``;
- ``heads`` (several teachers only): every head's state dict in teacher order (``heads[0]`` is ``head``);
  ``head`` is empty (``{}``) for ``--loss dense``, which has no global head;
- ``dense_heads`` (``--loss dense`` / ``both`` only): the dense heads (1x1 convolutions, paper indices),
  one per teacher;
- ``optimizer``, ``scaler``, ``rng``: what an exact resume needs.
No teacher weights are stored.
"""

from __future__ import annotations

from models.io import CheckpointError

# 1: the first release; 2: the run identity holds the dataset fingerprint (relative paths included).
CHECKPOINT_VERSION = 2
KEYS = ("version", "epoch", "progress", "identity", "args", "student", "head", "optimizer", "scaler", "rng")


def training_state(**parts: object) -> dict:
    """The checkpoint dict from its parts (every key of :data:`KEYS` but ``version``), versioned."""
    missing = [k for k in KEYS if k != "version" and k not in parts]
    if missing:
        raise ValueError(f"a training checkpoint needs {', '.join(missing)}")
    return {"version": CHECKPOINT_VERSION, **parts}


def is_simreg_checkpoint(raw: object) -> bool:
    """True for a checkpoint this project wrote (any version)."""
    return isinstance(raw, dict) and "version" in raw and isinstance(raw.get("student"), dict)


def check_training_checkpoint(raw: object, path: str) -> dict:
    """``raw`` if it is a full training checkpoint of this project, else a CheckpointError naming the fix."""
    if not (is_simreg_checkpoint(raw) and "optimizer" in raw):
        raise CheckpointError(
            f"'{path}' is not a training checkpoint of this project (no version/student/optimizer); "
            "to start from other weights use --weights"
        )
    if raw["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"'{path}' was written by a newer version of this project (checkpoint version {raw['version']}, "
            f"this one reads up to {CHECKPOINT_VERSION}); update the code"
        )
    return raw
