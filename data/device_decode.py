"""Batched JPEG decoding on the training device (``--decode gpu``): nvJPEG on CUDA, libjpeg-turbo on a CPU.

The work is split so that every sample keeps the crop of the CPU pipeline:
- loader workers (:class:`data.transforms.WeakAug` with ``decode="gpu"``) read a file's bytes and draw its
  RandomResizedCrop box and flip from the sample's (seed, epoch, index) RNG exactly as the CPU decoders
  do, and return an :class:`EncodedCrop`; a file that is not a plain JPEG (PNG, CMYK JPEG, ...) is
  decoded and cropped right there by the reference path and counted;
- :func:`collate_encoded` packs a batch into one :class:`EncodedBatch` (all bytes in one buffer, so a
  batch crosses from a worker in one piece);
- the main process calls :meth:`EncodedBatch.decode` (in training, from the background thread of
  :class:`data.prefetch.DevicePrefetcher`, one batch ahead of the step): one batched
  ``torchvision.io.decode_jpeg`` on the device, then crop, antialiased bilinear resize and flip, giving
  uint8 (B, 3, S, S) on the device. On CUDA the crops of a batch are resized together
  (:func:`resize_crops`: two batched matrix products per group of similar sizes instead of about eight
  kernels per image); on the CPU one image at a time with torch's uint8 kernel.
With the CPU as the device the same code gives exactly the ``tv`` decoder's crops (tested); on CUDA the
pixels differ from libjpeg's by nvJPEG's IDCT and chroma upsampling only (tests/test_device_decode.py).

nvJPEG (torchvision's CUDA decoder) allocates its outputs on the calling thread's current stream but
writes them on a private stream that does not wait for that stream's queued work (pytorch/vision#9606):
a block the caching allocator just took back from a kernel still queued could be overwritten. Every
device decode here first waits, on the host, until the current stream is idle (:func:`nvjpeg_decode`);
training calls it from the prefetch thread's side stream, so that wait never holds the training thread.

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

    def decode(self, device: torch.device | str, batched: bool | None = None) -> torch.Tensor:
        """Decode, crop, resize and flip on ``device`` -> uint8 (B, 3, S, S) in batch order.

        ``batched`` (default: on CUDA) resizes the crops together (:func:`resize_crops`), else one by one
        with the uint8 kernel the CPU decoders use.
        """
        device = torch.device(device)
        batched = device.type != "cpu" if batched is None else batched
        out = torch.empty(self.batch_size, 3, self.size, self.size, dtype=torch.uint8, device=device)
        if self.lengths:
            images = decode_jpegs(list(self.data.split(self.lengths)), self.paths, device)
            for j, img in enumerate(images):
                if tuple(img.shape[1:]) != self.shapes[j]:  # a box outside the decoded image would be clipped silently
                    raise DataError(
                        f"'{self.paths[j]}' decoded to {tuple(img.shape[1:])} pixels, its header says "
                        f"{self.shapes[j]}; delete or replace the file"
                    )
            if batched:
                resize_crops(images, self.boxes, self.flips, self.size, out, self.slots)
            else:
                for j, img in enumerate(images):
                    crop = resize_crop_uint8(img, self.boxes[j], self.size)
                    out[self.slots[j]] = crop.flip(-1) if self.flips[j] else crop
        if self.decoded_slots:
            slots = host_to_device(torch.tensor(self.decoded_slots), device)
            out.index_copy_(0, slots, self.decoded.to(device, non_blocking=True))
        return out


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host wait (through pinned memory on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ============ crops resized together ============
GROUP_BYTES = 256 << 20  # float32 bytes of one group's padded crops (B_g, 3, h_max, w_max)


def aa_weights(sizes: torch.Tensor, out_size: int, length: int) -> torch.Tensor:
    """Antialiased bilinear weights (N, out_size, length) float32: row o of image i maps its ``sizes[i]`` input
    pixels (then zeros up to ``length``) to output pixel o.

    The filter and window are torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``
    (PIL's): scale = in / out, a triangle of half-width max(scale, 1) centred at scale * (o + 0.5), the
    window cut at whole pixels as torch cuts it, the weights normalised to sum 1.
    """
    scale = (sizes.to(torch.float32) / out_size)[:, None, None]  # (N, 1, 1)
    support = torch.clamp(scale, min=1.0)
    invscale = 1.0 / support
    centre = scale * (torch.arange(out_size, device=sizes.device, dtype=torch.float32)[None, :, None] + 0.5)
    lo = torch.clamp(torch.trunc(centre - support + 0.5), min=0)  # (N, S, 1)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), sizes.to(torch.float32)[:, None, None])
    j = torch.arange(length, device=sizes.device, dtype=torch.float32)[None, None, :]  # (1, 1, L)
    w = torch.clamp(1.0 - ((j - centre + 0.5) * invscale).abs(), min=0.0)
    w = torch.where((j >= lo) & (j < hi), w, torch.zeros((), device=sizes.device))
    total = w.sum(dim=2, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def crop_groups(boxes: Sequence[Box], budget: int = GROUP_BYTES) -> list[list[int]]:
    """Indices of ``boxes`` in groups of similar crop size whose padded float32 crops fit in ``budget`` bytes."""
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][3], boxes[i][2]))
    groups, h, w = [], 0, 0
    for i in order:
        bh, bw = max(h, boxes[i][3]), max(w, boxes[i][2])
        if groups and (len(groups[-1]) + 1) * 3 * bh * bw * 4 <= budget:
            groups[-1].append(i)
            h, w = bh, bw
        else:
            groups.append([i])
            h, w = boxes[i][3], boxes[i][2]
    return groups


def resize_crops(
    images: Sequence[torch.Tensor],
    boxes: Sequence[Box],
    flips: Sequence[bool],
    size: int,
    out: torch.Tensor,
    slots: Sequence[int],
    budget: int = GROUP_BYTES,
) -> None:
    """Crop ``boxes[i]`` of ``images[i]`` (uint8 (3, H_i, W_i)), resize to (3, size, size) antialiased bilinear,
    flip where ``flips[i]``, into ``out[slots[i]]`` (uint8 (B, 3, size, size)); groups of crops at once.

    Each group's crops are copied into one zero-weighted padding (G, 3, h_max, w_max) and resized by two
    batched products with per-image weight matrices (:func:`aa_weights`): along x then along y, the order
    of torch's antialiased kernel, in float32, then rounded. A flip is the x weights' rows reversed. The
    result equals per-image ``F.interpolate(crop.float(), antialias=True).round()`` up to the order of
    float32 sums (tests/test_device_decode.py).
    """
    device = out.device
    for group in crop_groups(boxes, budget):
        hs = [boxes[i][3] for i in group]
        ws = [boxes[i][2] for i in group]
        buf = torch.empty(len(group), 3, max(hs), max(ws), dtype=torch.uint8, device=device)
        for g, i in enumerate(group):  # padding stays unwritten: its weights are 0 and uint8 is always finite
            left, top, w, h = boxes[i]
            buf[g, :, :h, :w].copy_(images[i][:, top : top + h, left : left + w])
        meta = host_to_device(torch.tensor([hs, ws, [int(flips[i]) for i in group], [slots[i] for i in group]]), device)
        wy, wx = aa_weights(meta[0], size, buf.shape[2]), aa_weights(meta[1], size, buf.shape[3])
        wx = torch.where(meta[2].bool()[:, None, None], wx.flip(1), wx)
        x = buf.float().view(len(group), 3 * buf.shape[2], buf.shape[3])
        t = torch.bmm(x, wx.transpose(1, 2)).view(len(group), 3, buf.shape[2], size)  # along x: (G, 3, h_max, S)
        y = torch.stack([torch.bmm(wy, t[:, c]) for c in range(3)], dim=1)  # along y: (G, 3, S, S)
        out.index_copy_(0, meta[3], y.round_().clamp_(0, 255).to(torch.uint8))


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


def nvjpeg_decode(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    """``torchvision.io.decode_jpeg`` on a CUDA ``device``, safe for the memory it writes.

    nvJPEG writes its outputs on a private stream that does not wait for the current stream, where the
    outputs were allocated (pytorch/vision#9606): it could overwrite a block freed by a kernel still
    queued there. So the current stream is made idle first (a host wait; training decodes on a side
    stream in a background thread, where the wait costs the step nothing). The current stream waits
    for nvJPEG's stream afterwards (torchvision records that dependency itself).
    """
    torch.cuda.current_stream(device).synchronize()
    return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def decode_jpegs(datas: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (L_i,) on ``device`` in one batched call -> uint8 RGB (3, H_i, W_i) each.

    One file the batched call cannot decode fails the whole call; then each file is decoded on its own,
    and one the device cannot decode is decoded on the CPU (with a warning naming it).
    """
    try:
        if device.type == "cuda":
            return list(nvjpeg_decode(datas, device))
        return list(torchvision.io.decode_jpeg(datas, mode=torchvision.io.ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [_decode_one(data, path, device) for data, path in zip(datas, paths, strict=True)]


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    rgb = torchvision.io.ImageReadMode.RGB
    if device.type == "cuda":
        try:
            return nvjpeg_decode(data, device)
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
        if device.type == "cuda":
            nvjpeg_decode([tiny], device)
        else:
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
        return f"JPEGs decoded in batches on {device} by the prefetch thread, one batch ahead of the step"
    return f"JPEGs decoded in the loader workers (decoder {'cpu' if decode == 'auto' else decode})"
