"""Fast JPEG decoding for the training crops, chosen by measurement (see BENCHMARKS.md).

Every decoder here answers the same question as the reference pipeline (``load_rgb`` then PIL's
``resize(box=...)``): the RandomResizedCrop box ``(left, top, w, h)`` of the *full-size* image,
resized to ``size`` x ``size`` with antialiased bilinear filtering, as a uint8 tensor (3, size, size).
The box is always drawn from the full image size read from the JPEG header, so a decoder never
changes which crop a sample gets; only the pixel arithmetic differs (tolerances in tests/test_decode.py).

Decoders (``DECODERS``):
- ``pil``: the reference; full PIL decode, PIL resize.
- ``draft``: PIL decoding at 1/2, 1/4 or 1/8 size in the DCT domain (``Image.draft``) when the crop
  still has at least ``size`` pixels on its short side at that scale; the box is mapped into the reduced
  image's coordinates (divided by the scale, fractional) and resized by PIL.
- ``tv``: ``torchvision.io.decode_jpeg`` (libjpeg-turbo) and torch's antialiased uint8 resize.
- ``auto`` (default): ``draft`` for images of a megapixel or more whose crop allows it, else ``tv``;
  the fastest on CPU as measured (25-35% faster than ``tv`` on 2000x1500 images, no gain at 500x375).
Files that are not plain JPEGs (PNG, CMYK JPEG, truncated files, ...) always take the reference path.

Batched decoding on a device and NVIDIA DALI are speed references of the benchmark
(``tools/bench/device_decode.py``); training uses the decoders here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from data.datasets import DataError, load_rgb

Box = tuple[int, int, int, int]  # (left, top, width, height) in full-size pixels

# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_info(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame header, or None if not a JPEG."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers carry no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 10 > n:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height, data[pos + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header: not something we handle
            return None
        pos += 2 + length
    return None


@dataclass
class EncodedImage:
    """A plain JPEG (grey or YCbCr) not decoded yet: its bytes and the full size from its header."""

    path: str
    data: bytes
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def open_image(path: str, data: bytes | None = None) -> EncodedImage | Image.Image:
    """Read a file for the fast decoders: an :class:`EncodedImage` for plain, complete JPEGs.

    Anything else (PNG, CMYK or truncated JPEG, ...) is decoded at once by the reference ``load_rgb``,
    so it keeps exactly the reference behaviour, errors included. ``data``: the file's bytes, already
    read (a shard's sample); ``path`` then only names it.
    """
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DataError(f"cannot read image '{path}' ({exc}); delete or replace the file") from exc
    info = jpeg_info(data)
    # A complete JPEG ends with the EOI marker; libjpeg would pad a truncated one with grey instead of failing.
    complete = data[-4096:].rstrip(b"\0").endswith(b"\xff\xd9")
    if info is None or info[2] not in (1, 3) or min(info[:2]) == 0 or not complete:
        return load_rgb(path, data)
    return EncodedImage(path, data, info[0], info[1])


def draft_scale(box_w: int, box_h: int, size: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps the crop at least ``size`` px on each side."""
    for scale in (8, 4, 2):
        if min(box_w, box_h) >= size * scale:
            return scale
    return 1


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def resize_crop_uint8(img: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Crop ``box`` of a uint8 image (3, H, W) and resize to (3, size, size), antialiased bilinear.

    torch's uint8 antialiased kernel follows PIL's filter (support scaled by the reduction factor).
    """
    left, top, w, h = box
    crop = img[None, :, top : top + h, left : left + w]
    if crop.device.type != "cpu":  # CUDA has no uint8 antialiased kernel: float, round, back
        out = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)[0]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].contiguous()


def decode_pil(img: EncodedImage, box: Box, size: int) -> torch.Tensor:
    """The reference: full decode by ``load_rgb``, PIL bilinear resize of the box."""
    left, top, w, h = box
    rgb = load_rgb(img.path, img.data)
    return pil_to_uint8(rgb.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))


def decode_draft(img: EncodedImage, box: Box, size: int) -> torch.Tensor:
    """PIL reduced-size decoding when the crop allows it; the box is mapped into the reduced image."""
    left, top, w, h = box
    scale = draft_scale(w, h, size)
    if scale == 1:
        return decode_pil(img, box, size)
    try:
        with Image.open(io.BytesIO(img.data)) as pil:
            # draft picks the largest reduction whose result is at least the requested size and
            # returns the full image's extent in reduced coordinates, (0, 0, W / s, H / s).
            drafted = pil.draft("RGB", (img.width // scale, img.height // scale))
            rgb = pil.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image '{img.path}' ({exc}); delete or replace the file") from exc
    s = img.width / drafted[1][2] if drafted else 1.0  # DCT scaling by 1/s maps pixel x to x / s
    mapped = (left / s, top / s, (left + w) / s, (top + h) / s)
    return pil_to_uint8(rgb.resize((size, size), Image.BILINEAR, box=mapped))


def decode_tv(img: EncodedImage, box: Box, size: int) -> torch.Tensor:
    """torchvision (libjpeg-turbo) full decode, torch antialiased uint8 resize.

    torchvision 0.29 deprecates its image decoders (TorchCodec supersedes them); where a later release
    has removed ``decode_jpeg``, this falls back to the reference path.
    """
    if not hasattr(torchvision.io, "decode_jpeg"):
        return decode_pil(img, box, size)
    data = torch.frombuffer(bytearray(img.data), dtype=torch.uint8)
    try:
        full = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DataError(f"cannot read image '{img.path}' ({exc}); delete or replace the file") from exc
    return resize_crop_uint8(full, box, size)


# Below about a megapixel the entropy decoding that draft cannot skip dominates, and PIL's resize of a
# fractional box costs more than the reduced IDCT saves (BENCHMARKS.md, "Choosing the decoder").
DRAFT_MIN_PIXELS = 1_000_000


def decode_auto(img: EncodedImage, box: Box, size: int) -> torch.Tensor:
    """``draft`` for large images whose crop allows a DCT reduction, else ``tv`` (the measured fastest)."""
    if img.width * img.height >= DRAFT_MIN_PIXELS and draft_scale(box[2], box[3], size) > 1:
        return decode_draft(img, box, size)
    return decode_tv(img, box, size)


DECODERS: dict[str, Callable[[EncodedImage, Box, int], torch.Tensor]] = {
    "auto": decode_auto,
    "pil": decode_pil,
    "draft": decode_draft,
    "tv": decode_tv,
}
