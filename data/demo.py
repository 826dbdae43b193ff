"""The embedded demo dataset: scikit-learn's handwritten digits on a 32x32 canvas, as an ImageFolder.

Each 8x8 digit is scaled (to 12-24 pixels) and placed at a random position on a dark 32x32 canvas
with a little noise, so raw pixels and random features do not solve it. Written once as
``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (an 80/20 split per class).

    python -m data.demo demo_data
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from models.io import read_json, write_json

CANVAS = 32
VERSION = 1


def render_digit(pixels: np.ndarray, rng: np.random.RandomState) -> Image.Image:
    """One 8x8 digit (values 0..16) -> RGB 32x32 image at a random scale, position and tint."""
    size = rng.randint(12, 25)
    digit = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    canvas = rng.randint(0, 40, size=(CANVAS, CANVAS)).astype(np.float32)
    x, y = rng.randint(0, CANVAS - size + 1, size=2)
    canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], np.asarray(digit))
    tint = rng.uniform(0.6, 1.0, size=3)
    rgb = np.clip(canvas[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def make_demo_dataset(root: str, seed: int = 0) -> str:
    """Write the demo ImageFolder under ``root`` (skipped when a complete copy is there); returns root."""
    stamp = os.path.join(root, "demo.json")
    if (read_json(stamp) or {}).get("version") == VERSION:
        return root
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = len(idx) // 5
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                render_digit(digits.images[i], rng).save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += len(part)
    write_json(stamp, {"version": VERSION, "seed": seed, "canvas": CANVAS, **counts})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    print(make_demo_dataset(parser.parse_args().root, parser.parse_args().seed))


if __name__ == "__main__":
    main()
