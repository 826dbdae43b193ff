"""Tiny image folders and checkpoints for the evaluation tests (imported by test_eval_*.py)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_image_folder(root: str, counts: dict[str, int], classes: int = 3, size: int = 16, seed: int = 0) -> str:
    """root/<split>/c<label>/<i>.png with ``counts[split]`` images per class; each class has its own tint."""
    rng = np.random.RandomState(seed)
    for split, n in counts.items():
        for label in range(classes):
            folder = os.path.join(root, split, f"c{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3))
                base[..., label % 3] = 160.0
                img = np.clip(base + rng.randint(0, 96, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img, "RGB").save(os.path.join(folder, f"{i:03d}.png"))
    return root
