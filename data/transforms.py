"""Transform presets producing uint8 tensors (3, H, W); conversion to float happens on the device.

Random transforms take an explicit ``random.Random`` so that a sample's augmentation is a function of
(seed, epoch, index) only.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from data.datasets import load_rgb
from data.decode import DECODERS, EncodedImage, open_image
from data.device_decode import DEVICE_DECODE, EncodedCrop, collate_encoded, resolve_decode


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def rrc_box(width: int, height: int, rng: random.Random, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (left, top, w, h): area fraction in ``scale``, log-uniform aspect."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


PAPER_MIN_SCALE = 0.2  # RandomResizedCrop's smallest area fraction in the paper's (MoCo-v2's) training views


class WeakAug:
    """RandomResizedCrop(size, scale) + horizontal flip (the paper's weak view).

    ``decode`` names a decoder of :mod:`data.decode`: ``pil`` (the reference, default here) or a fast
    one such as ``auto`` (what :class:`TrainViews` uses), or ``gpu``: the crop is left to
    :mod:`data.device_decode` (an :class:`EncodedCrop` comes out; files that are not plain JPEGs are
    decoded here by the reference path and counted). ``loader`` is how a dataset should open files for
    this transform: with a fast decoder, plain JPEGs arrive undecoded and only the crop is decoded,
    with the same box and flip.
    """

    def __init__(self, size: int = 224, scale=(PAPER_MIN_SCALE, 1.0), flip: bool = True, decode: str = "pil") -> None:
        if decode not in DECODERS and decode != DEVICE_DECODE:
            raise ValueError(f"unknown decoder '{decode}'; choose one of {', '.join([*DECODERS, DEVICE_DECODE])}")
        self.size, self.scale, self.flip, self.decode = size, scale, flip, decode
        self.loader = load_rgb if decode == "pil" else open_image
        # Shared with the loader's worker processes, which count the files the device cannot decode.
        self._cpu_decoded = torch.zeros(1, dtype=torch.int64).share_memory_() if decode == DEVICE_DECODE else None

    def cpu_decoded(self) -> int:
        """With ``decode="gpu"``: how many images so far were not plain JPEGs and were decoded on the CPU."""
        return int(self._cpu_decoded[0]) if self._cpu_decoded is not None else 0

    def crop(self, img: Image.Image, rng: random.Random) -> Image.Image:
        left, top, w, h = rrc_box(img.width, img.height, rng, self.scale)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        flip = self.flip and rng.random() < 0.5
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    def __call__(self, img: Image.Image | EncodedImage, rng: random.Random) -> torch.Tensor | EncodedCrop:
        if isinstance(img, EncodedImage):  # same RNG draws as crop(): box, then flip
            box = rrc_box(img.width, img.height, rng, self.scale)
            if self.decode == DEVICE_DECODE:
                flip = self.flip and rng.random() < 0.5
                return EncodedCrop(img.path, img.data, img.height, img.width, box, flip, self.size)
            out = DECODERS[self.decode](img, box, self.size)
            return out.flip(-1) if self.flip and rng.random() < 0.5 else out
        if self._cpu_decoded is not None:
            self._cpu_decoded += 1
        return to_uint8_tensor(self.crop(img, rng))


class StrongAug(WeakAug):
    """MoCo-v2's view: crop, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5, flip."""

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        left, top, w, h = rrc_box(img.width, img.height, rng, self.scale)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.8:
            img = self.jitter(img, rng)
        if rng.random() < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(img)

    @staticmethod
    def jitter(img: Image.Image, rng: random.Random) -> Image.Image:
        ops = [
            (TF.adjust_brightness, rng.uniform(0.6, 1.4)),
            (TF.adjust_contrast, rng.uniform(0.6, 1.4)),
            (TF.adjust_saturation, rng.uniform(0.6, 1.4)),
            (TF.adjust_hue, rng.uniform(-0.1, 0.1)),
        ]
        rng.shuffle(ops)
        for fn, factor in ops:
            img = fn(img, factor)
        return img


class CenterCrop:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size`` (evaluation and caching)."""

    def __init__(self, resize_size: int = 256, crop_size: int = 224) -> None:
        self.resize_size, self.crop_size = resize_size, crop_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = TF.resize(img, self.resize_size, interpolation=TF.InterpolationMode.BILINEAR)
        return to_uint8_tensor(TF.center_crop(img, self.crop_size))


class TrainViews:
    """The four view modes of the paper.

    - single view (``single=True``): ONE tensor, fed to both networks (the paper's best setting);
    - otherwise a pair (student view, teacher view) of independent samples of their augmentations.
    As in the original, ``weak_strong`` wins over ``weak_weak``; with neither both views are strong,
    and the single view uses the student's augmentation.
    """

    def __init__(
        self,
        size: int,
        single: bool,
        weak_weak: bool,
        weak_strong: bool,
        decode: str = "auto",
        min_scale: float = PAPER_MIN_SCALE,
        flip: bool = True,
    ) -> None:
        scale = (min_scale, 1.0)
        weak, strong = WeakAug(size, scale, flip, decode=decode), StrongAug(size, scale, flip)
        if weak_strong:
            self.student, self.teacher = strong, weak
        elif weak_weak:
            self.student, self.teacher = weak, weak
        else:
            self.student, self.teacher = strong, strong
        self.single = single
        # Fast decoding serves the single view (one crop per file); two views share one full decode.
        self.loader = self.student.loader if single else load_rgb
        device_decode = single and getattr(self.student, "decode", None) == DEVICE_DECODE
        # How a loader should batch these samples (None: PyTorch's default collation of uint8 crops).
        self.collate = collate_encoded if device_decode else None

    def decode_stats(self) -> dict:
        """For the epoch log: with device decoding, the images decoded on the CPU so far (not plain JPEGs)."""
        if self.collate is None:
            return {}
        return {"cpu_decoded_images": self.student.cpu_decoded()}

    @property
    def decoder(self) -> str:
        """The decoder that makes the pixels: ``--decode`` serves the single view; pairs decode with PIL."""
        return self.student.decode if self.single else "pil"

    def record(self, seed: int) -> dict:
        """What fixes a sample's pixels besides (epoch, index): mode (crop scale and flip included), crop
        size, seed and decoder."""
        return {"mode": self.name, "image_size": self.student.size, "seed": seed, "decode": self.decoder}

    @property
    def name(self) -> str:
        kind = {WeakAug: "weak", StrongAug: "strong"}
        if self.single:
            name = f"single {kind[type(self.student)]} view"
        else:
            name = f"teacher {kind[type(self.teacher)]} / student {kind[type(self.student)]}"
        # The paper's crops keep the names runs and caches were recorded with; other crops say how they differ.
        changes = [f"crop scale {self.student.scale[0]:g}-1"] if self.student.scale[0] != PAPER_MIN_SCALE else []
        changes += [] if self.student.flip else ["no flip"]
        return f"{name} ({', '.join(changes)})" if changes else name

    def __call__(self, img: Image.Image, rng: random.Random):
        if self.single:
            return self.student(img, rng)
        return self.student(img, rng), self.teacher(img, rng)


def training_views(
    size: int,
    single: bool,
    weak_weak: bool,
    weak_strong: bool,
    decode: str,
    device: torch.device,
    paths: list[str],
    min_scale: float = PAPER_MIN_SCALE,
    flip: bool = True,
) -> TrainViews:
    """The training run's :class:`TrainViews`, with ``--decode`` resolved as training resolves it for these
    files on ``device`` (training and the K-view cache builder must draw the very same crops)."""
    single_weak = single and weak_weak and not weak_strong
    return TrainViews(
        size, single, weak_weak, weak_strong, resolve_decode(decode, device, paths, single_weak), min_scale, flip
    )


class TeacherView:
    """A :class:`TrainViews` reduced to the teacher's tensor (3, H, W): the crops a K-view cache stores.

    It draws from the sample's RNG exactly as training does (the student's view first in pair modes),
    so row (epoch, index) of such a cache is the teacher's feature of the crop training feeds it.
    """

    def __init__(self, views: TrainViews) -> None:
        self.views, self.loader = views, views.loader
        self.collate = views.collate  # device decoding (--decode gpu): encoded crops, decoded in the builder

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        views = self.views(img, rng)
        return views if self.views.single else views[1]
