"""Batched JPEG decoding on a device and NVIDIA DALI: speed references of the benchmark.

``EncodedCrops`` makes loader workers read JPEG bytes and draw each sample's crop box and flip exactly
as :class:`data.transforms.WeakAug` does; ``decode_crop_resize_batch`` decodes the batch on the device
(nvJPEG on CUDA), crops, resizes and flips there. ``dali_iterator`` is NVIDIA DALI's own pipeline (an
optional dependency), with its own random crops.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch
import torchvision

from data.datasets import DataError
from data.decode import EncodedImage, open_image, resize_crop_uint8
from data.transforms import rrc_box


class EncodedCrops:
    """Dataset wrapper for device-side decoding: ``(jpeg bytes (L,) uint8, box (4,), flip, label, index)``.

    The box and flip are drawn exactly as :class:`data.transforms.WeakAug` draws them from the same
    per-sample RNG, so a batch decoded on the GPU shows the same crops as the CPU pipeline. Plain JPEGs only.
    """

    def __init__(self, dataset, scale: tuple[float, float] = (0.2, 1.0), flip: bool = True) -> None:
        self.dataset, self.scale, self.flip = dataset, scale, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rel, label = self.dataset.samples[index]
        img = open_image(os.path.join(self.dataset.root, rel))
        if not isinstance(img, EncodedImage):
            raise DataError(f"'{rel}' is not a plain JPEG; device decoding handles JPEG files only")
        rng: random.Random = self.dataset.rng(index, epoch)
        box = rrc_box(img.width, img.height, rng, self.scale)
        flip = self.flip and rng.random() < 0.5
        data = torch.frombuffer(bytearray(img.data), dtype=torch.uint8)
        return data, torch.tensor(box), flip, label, index


def collate_encoded(batch: Sequence) -> tuple[list[torch.Tensor], torch.Tensor, ...]:
    """Keep the variable-length byte tensors as a list; stack boxes (B, 4), flips, labels, indices."""
    datas, boxes, flips, labels, indices = zip(*batch, strict=True)
    return list(datas), torch.stack(boxes), torch.tensor(flips), torch.tensor(labels), torch.tensor(indices)


def decode_crop_resize_batch(
    datas: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int, device: torch.device
) -> torch.Tensor:
    """Decode a list of JPEGs on ``device`` in one batched call, crop, resize, flip -> uint8 (B, 3, S, S).

    On CUDA, ``decode_jpeg(list, device="cuda")`` runs nvJPEG over the whole batch; the crops are
    resized on the GPU one by one (their sizes differ).
    """
    imgs = torchvision.io.decode_jpeg(datas, mode=torchvision.io.ImageReadMode.RGB, device=device)
    out = torch.empty(len(imgs), 3, size, size, dtype=torch.uint8, device=device)
    for i, (img, box) in enumerate(zip(imgs, boxes.tolist(), strict=True)):
        crop = resize_crop_uint8(img, tuple(box), size)
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def dali_available() -> bool:
    """Whether NVIDIA DALI is importable (an optional dependency)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_iterator(
    files: Sequence[str], batch_size: int, size: int, num_threads: int, device_id: int = 0, seed: int = 0
):
    """A DALI pipeline (GPU decoding with ROI crops) yielding uint8 (B, 3, S, S) CUDA batches.

    DALI draws its own RandomResizedCrop boxes (same distribution: area 0.2-1, aspect 3/4-4/3), so its
    crops are not the per-sample crops of our RNG; it is a speed reference, not a drop-in replacement.
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=list(files), random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(
            jpegs, device="mixed", output_type=types.RGB, random_area=[0.2, 1.0], random_aspect_ratio=[0.75, 4 / 3]
        )
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
        return fn.crop_mirror_normalize(
            images, dtype=types.UINT8, output_layout="CHW", mirror=fn.random.coin_flip(probability=0.5)
        )

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    p.build()
    return DALIGenericIterator(p, ["images"], reader_name="reader", auto_reset=True)
