"""The embedded demo datasets, drawn from scikit-learn's handwritten digits.

Classification: each 8x8 digit is scaled (to 12-24 pixels) and placed at a random position on a dark
32x32 canvas with a little noise, so raw pixels and random features do not solve it. Written once as
``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (an 80/20 split per class).

Segmentation (``--seg``): two digits pasted on a textured 64x64 background, with their masks, in Pascal
VOC 2012's layout (what ``eval_seg.py`` reads) and as an ImageFolder of the same images.

    python -m data.demo demo_data
    python -m data.demo --seg demo_seg
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


# ============ the segmentation demo ============
SEG_VERSION = 2
SEG_CANVAS = 64
SEG_CLASSES = ("background", *(f"digit {d}" for d in range(10)))


def voc_palette() -> list[int]:
    """Pascal VOC's colour map, 256 RGB triples flattened: index i's bits spread over the high bits of R, G, B."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def textured_background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: two coloured sine gratings over smooth noise (no two alike)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((size, size, 3), np.float32)
    for _ in range(2):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        out += wave[:, :, None] * rng.uniform(10, 45, size=3)[None, None, :]
    coarse = rng.uniform(0, 40, size=(4, 4, 3)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(out + noise, 0, 255)


def paste_digit(image: np.ndarray, label: np.ndarray, pixels: np.ndarray, digit: int, size: int,
                rng: np.random.RandomState) -> None:  # fmt: skip
    """Blend one 8x8 digit scaled to ``size`` px at a random place, in a random bright colour; its mask in
    ``label``: class digit + 1 where the glyph is solid, 255 (ignored) on its soft rim, as VOC's borders."""
    glyph = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    alpha = np.asarray(glyph, np.float32) / 255.0
    y, x = rng.randint(0, image.shape[0] - size + 1, size=2)
    colour = rng.uniform(170, 255, size=3)
    region = image[y : y + size, x : x + size]
    region[:] = region * (1 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]
    lab = label[y : y + size, x : x + size]
    lab[alpha >= 0.5] = digit + 1
    lab[(alpha >= 0.2) & (alpha < 0.5)] = 255


def make_seg_dataset(root: str, seed: int = 0, n_train: int = 800, n_val: int = 240) -> str:
    """Write the segmentation demo under ``root`` (skipped when a complete copy is there); returns root.

    Pascal VOC 2012's layout (``JPEGImages/``, palette PNGs in ``SegmentationClass/``,
    ``ImageSets/Segmentation/{train,val}.txt``, and ``classes.txt``: background and the ten digits), each
    64 x 64 image a dark textured background with a large digit (30-44 px) and a small one (14-22 px) pasted on
    it. The same images also as an ImageFolder (``train/<digit>/``, ``val/<digit>/``, the large digit's
    class), so students can be distilled on them and evaluated by k-NN. Train and val use disjoint glyphs.
    """
    stamp = os.path.join(root, "demo_seg.json")
    if (read_json(stamp) or {}).get("version") == SEG_VERSION:
        return root
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(digits.target))
    glyphs = {"train": order[: len(order) * 4 // 5], "val": order[len(order) * 4 // 5 :]}
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    palette = voc_palette()
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for k in range(n):
            image = textured_background(rng, SEG_CANVAS)
            label = np.zeros((SEG_CANVAS, SEG_CANVAS), np.uint8)
            big, small = rng.choice(glyphs[split], size=2, replace=False)
            paste_digit(image, label, digits.images[small], int(digits.target[small]), rng.randint(14, 23), rng)
            paste_digit(image, label, digits.images[big], int(digits.target[big]), rng.randint(30, 45), rng)
            name = f"{split}_{k:04d}"
            rgb = Image.fromarray(image.astype(np.uint8), "RGB")
            rgb.save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=95)
            png = Image.fromarray(label, "P")
            png.putpalette(palette)
            png.save(os.path.join(root, "SegmentationClass", f"{name}.png"))
            folder = os.path.join(root, split, str(int(digits.target[big])))
            os.makedirs(folder, exist_ok=True)
            rgb.save(os.path.join(folder, f"{name}.jpg"), quality=95)
            ids.append(name)
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(SEG_CLASSES) + "\n")
    write_json(stamp, {"version": SEG_VERSION, "seed": seed, "canvas": SEG_CANVAS, "train": n_train, "val": n_val})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=None, help="output folder (default: demo_data)")
    parser.add_argument("--seg", default=None, metavar="DIR", help="write the segmentation demo (VOC layout) in DIR")
    parser.add_argument("--seed", type=int, default=0)
    print(write(parser, **vars(parser.parse_args())))


def write(parser: argparse.ArgumentParser, root: str | None, seg: str | None, seed: int) -> str:
    """The classification demo in ``root``, or the segmentation demo in ``seg``; returns the folder."""
    if seg and root:
        parser.error("give either ROOT (the classification demo) or --seg DIR (the segmentation demo), not both")
    return make_seg_dataset(seg, seed) if seg else make_demo_dataset(root or "demo_data", seed)


if __name__ == "__main__":
    main()
