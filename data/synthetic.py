"""ImageNet-like JPEG folders for speed measurements: about 500x375 pixels, quality 90, ~100 KB each.

The pictures are smooth random gratings and blobs plus grain, tuned so that a file's size (what the
JPEG decoder's entropy stage costs) is close to an average ImageNet training image.
"""

from __future__ import annotations

import os
from multiprocessing import get_context

import numpy as np
from PIL import Image

from models.io import read_json, write_json

VERSION = 1


def textured_image(rng: np.random.Generator, width: int = 500, height: int = 375, grain: float = 20.0) -> Image.Image:
    """A random RGB picture: 6 gratings, 8 soft blobs and Gaussian grain of std ``grain`` (0-255 scale)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 128.0, np.float32)
    for _ in range(6):
        fx, fy = rng.uniform(-0.08, 0.08, 2)
        img += rng.uniform(10, 40, 3) * np.sin(fx * x + fy * y + rng.uniform(0, 2 * np.pi))[..., None]
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 120)
        img += rng.uniform(-60, 60, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
    img += rng.normal(0.0, grain, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_one(job: tuple[str, int, int, int, int]) -> int:
    path, seed, width, height, quality = job
    # Odd sizes on some images, as in real data (the decoders must handle partial DCT blocks).
    textured_image(np.random.default_rng(seed), width, height).save(path, quality=quality)
    return os.path.getsize(path)


def make_jpeg_folder(
    root: str,
    n_images: int,
    n_classes: int = 10,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    processes: int = 1,
) -> dict:
    """Write ``root/train/<class>/<i>.jpg`` (skipped when an identical set is there); returns its manifest."""
    stamp = os.path.join(root, "jpegs.json")
    spec = {"version": VERSION, "n_images": n_images, "n_classes": n_classes, "size": list(size), "quality": quality}
    spec["seed"] = seed
    found = read_json(stamp) or {}
    if found and all(found.get(k) == v for k, v in spec.items()):
        return found
    jobs = []
    for i in range(n_images):
        folder = os.path.join(root, "train", f"class_{i % n_classes:03d}")
        os.makedirs(folder, exist_ok=True)
        w, h = size if i % 4 else (size[0] + 1, size[1] - 1)
        jobs.append((os.path.join(folder, f"{i:06d}.jpg"), seed * 1_000_003 + i, w, h, quality))
    if processes > 1:
        with get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=8)
    else:
        sizes = [_write_one(j) for j in jobs]
    manifest = {**spec, "mean_kb": round(float(np.mean(sizes)) / 1000, 1)}
    write_json(stamp, manifest)
    return manifest
