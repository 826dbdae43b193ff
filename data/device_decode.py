"""Batched JPEG decoding on the training device (``--decode gpu``): nvJPEG on CUDA, libjpeg-turbo on a CPU.

The work is split so that every sample keeps the crop of the CPU pipeline:
- loader workers (:class:`data.transforms.WeakAug` with ``decode="gpu"``) read a file's bytes and draw its
  RandomResizedCrop box and flip from the sample's (seed, epoch, index) RNG exactly as the CPU decoders
  do, and return an :class:`EncodedCrop`; a file that is not a plain JPEG (PNG, CMYK JPEG, ...) is
  decoded and cropped right there by the reference path and counted;
- :func:`collate_encoded` packs a batch into one :class:`EncodedBatch` (all bytes in one buffer, so a
  batch crosses from a worker in one piece);
- the main process calls :meth:`EncodedBatch.decode`: one batched ``torchvision.io.decode_jpeg`` on the
  device, then crop, antialiased bilinear resize and flip there, giving uint8 (B, 3, S, S) on the device.
With the CPU as the device the same code gives exactly the ``tv`` decoder's crops (tested); on CUDA the
pixels differ from libjpeg's by nvJPEG's IDCT and chroma upsampling only (tests/test_device_decode.py).

:func:`resolve_decode` turns the ``--decode`` flag into what a run uses: ``auto`` is ``gpu`` on CUDA for
the single weak view of a folder of JPEG files, and the CPU decoders otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torchvision

from data.datasets import DataError
from data.decode import DECODERS, Box, resize_crop_uint8
from models.errors import UserError

log = logging.getLogger(__name__)

DEVICE_DECODE = "gpu"  # the transform-level name of batched decoding on the run's device
# --decode: ``cpu`` is the fastest CPU decoder per image (the ``auto`` rule of data.decode).
DECODE_CHOICES = ("auto", "cpu", DEVICE_DECODE, *(d for d in DECODERS if d != "auto"))
JPEG_SUFFIXES = (".jpg", ".jpeg")
JPEG_SHARE_FOR_AUTO = 0.99  # ImageNet: a few dozen CMYK or PNG-in-disguise files among 1.28 M JPEGs


@dataclass
class EncodedCrop:
    """One sample for device decoding: the JPEG's bytes, its full size and the crop box and flip drawn for it."""

    path: str
    data: bytes
    height: int  # full image size from the JPEG header; the box is in these pixels
    width: int
    box: Box  # (left, top, width, height)
    flip: bool
    size: int  # output crop size


@dataclass
class EncodedBatch:
    """A loader batch for device decoding: ``decode(device)`` gives uint8 (B, 3, S, S) on ``device``.

    ``slots[j]`` is the batch position of the j-th JPEG; ``decoded`` (F, 3, S, S) holds the crops the
    workers already made on the CPU (files that are not plain JPEGs) for positions ``decoded_slots``.
    """

    batch_size: int
    size: int
    data: torch.Tensor  # (L,) uint8: every JPEG's bytes, one after the other
    lengths: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per JPEG
    boxes: list[Box] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decoded: torch.Tensor | None = None
    decoded_slots: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.batch_size

    def pin_memory(self) -> EncodedBatch:
        """The DataLoader's pinning hook: only the ready crops are copied to the device later."""
        return replace(self, decoded=self.decoded.pin_memory()) if self.decoded is not None else self

    def decode(self, device: torch.device | str) -> torch.Tensor:
        """Decode, crop, resize and flip on ``device`` -> uint8 (B, 3, S, S) in batch order."""
        device = torch.device(device)
        out = torch.empty(self.batch_size, 3, self.size, self.size, dtype=torch.uint8, device=device)
        if self.lengths:
            images = decode_jpegs(list(self.data.split(self.lengths)), self.paths, device)
            for j, img in enumerate(images):
                if tuple(img.shape[1:]) != self.shapes[j]:  # a box outside the decoded image would be clipped silently
                    raise DataError(
                        f"'{self.paths[j]}' decoded to {tuple(img.shape[1:])} pixels, its header says "
                        f"{self.shapes[j]}; delete or replace the file"
                    )
                crop = resize_crop_uint8(img, self.boxes[j], self.size)
                out[self.slots[j]] = crop.flip(-1) if self.flips[j] else crop
        if self.decoded_slots:
            out[torch.tensor(self.decoded_slots, device=device)] = self.decoded.to(device, non_blocking=True)
        return out


def collate_encoded(samples: Sequence[tuple]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """``[(EncodedCrop or uint8 crop (3, S, S), label, index)]`` -> (EncodedBatch, labels (B,), indices (B,))."""
    items, labels, indices = zip(*samples, strict=True)
    jpegs = [(i, it) for i, it in enumerate(items) if isinstance(it, EncodedCrop)]
    ready = [(i, it) for i, it in enumerate(items) if not isinstance(it, EncodedCrop)]
    size = jpegs[0][1].size if jpegs else int(ready[0][1].shape[-1])
    data = b"".join(it.data for _, it in jpegs)
    batch = EncodedBatch(
        batch_size=len(items),
        size=size,
        data=torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
        lengths=[len(it.data) for _, it in jpegs],
        paths=[it.path for _, it in jpegs],
        shapes=[(it.height, it.width) for _, it in jpegs],
        boxes=[it.box for _, it in jpegs],
        flips=[it.flip for _, it in jpegs],
        slots=[i for i, _ in jpegs],
        decoded=torch.stack([it for _, it in ready]) if ready else None,
        decoded_slots=[i for i, _ in ready],
    )
    return batch, torch.tensor(labels), torch.tensor(indices)


def decode_jpegs(datas: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (L_i,) on ``device`` in one batched call -> uint8 RGB (3, H_i, W_i) each.

    One file the batched call cannot decode fails the whole call; then each file is decoded on its own,
    and one the device cannot decode is decoded on the CPU (with a warning naming it).
    """
    rgb = torchvision.io.ImageReadMode.RGB
    try:
        return list(torchvision.io.decode_jpeg(datas, mode=rgb, device=device))
    except RuntimeError:
        return [_decode_one(data, path, device) for data, path in zip(datas, paths, strict=True)]


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    rgb = torchvision.io.ImageReadMode.RGB
    if device.type != "cpu":
        try:
            return torchvision.io.decode_jpeg(data, mode=rgb, device=device)
        except RuntimeError:
            log.warning("'%s' could not be decoded on %s; decoding it on the CPU", path, device)
    try:
        return torchvision.io.decode_jpeg(data, mode=rgb).to(device)
    except RuntimeError as exc:
        raise DataError(f"cannot read image '{path}' ({exc}); delete or replace the file") from exc


# ============ which decoder a run uses ============
def jpeg_share(paths: Sequence[str]) -> float:
    """Fraction of ``paths`` named like JPEG files (.jpg / .jpeg, any case)."""
    return sum(p.lower().endswith(JPEG_SUFFIXES) for p in paths) / max(len(paths), 1)


def device_can_decode(device: torch.device) -> bool:
    """Whether torchvision can decode a JPEG on ``device`` (probed with a tiny image)."""
    if not hasattr(torchvision.io, "decode_jpeg"):  # removed in some later torchvision (TorchCodec)
        return False
    try:
        tiny = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        torchvision.io.decode_jpeg([tiny], device=device)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def resolve_decode(
    decode: str,
    device: torch.device,
    paths: Sequence[str],
    single_weak: bool,
    can_decode: Callable[[torch.device], bool] = device_can_decode,
) -> str:
    """The transform-level decoder for ``--decode``: ``gpu`` or a name of :data:`data.decode.DECODERS`.

    ``auto`` -> ``gpu`` on CUDA when the view is the single weak one and the files are JPEGs, else the CPU
    rule (``cpu``). ``gpu`` on a CPU run decodes with the same batched code on the CPU.
    """
    if decode not in DECODE_CHOICES:
        raise UserError(f"--decode {decode} is not a decoder; choose one of {', '.join(DECODE_CHOICES)}")
    if decode == "auto":
        use_device = device.type == "cuda" and single_weak and jpeg_share(paths) >= JPEG_SHARE_FOR_AUTO
        decode = DEVICE_DECODE if use_device and can_decode(device) else "cpu"
    if decode == "cpu":
        return "auto"
    if decode != DEVICE_DECODE:
        return decode
    if not single_weak:
        raise UserError(
            "--decode gpu decodes the single weak view (--single_aug --weak_weak); the other view modes "
            "decode on the CPU: drop --decode gpu or use --single_aug --weak_weak"
        )
    if not can_decode(device):
        raise UserError(f"this torchvision cannot decode JPEGs on {device}; use --decode cpu")
    if device.type == "cpu":
        log.info("--decode gpu on a CPU run: the batched decoder runs on the CPU (the crops of --decode tv)")
    return DEVICE_DECODE


def describe(decode: str, device: torch.device) -> str:
    """One phrase for the log: where this run decodes its JPEGs."""
    if decode == DEVICE_DECODE:
        return f"JPEGs decoded in batches on {device} in the main process"
    return f"JPEGs decoded in the loader workers (decoder {'cpu' if decode == 'auto' else decode})"
