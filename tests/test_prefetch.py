"""Batches made ready ahead of the step (data.prefetch), the crops resized together (data.device_decode),
and the stream rules that make both safe on CUDA, exercised here with recording stand-ins for the streams."""

from __future__ import annotations

import itertools
import random
import threading
import time
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from data import device_decode as DD
from data.datasets import DataError
from data.prefetch import DevicePrefetcher, HostOnly


def loader_of(n: int, fail_at: int | None = None):
    """``n`` batches (uint8 views (2, 3, 4, 4), labels, indices); an unreadable image at batch ``fail_at``."""
    for b in range(n):
        if b == fail_at:
            raise DataError(f"cannot read image 'img{b}.jpg' (bad Huffman code); delete or replace the file")
        views = torch.full((2, 3, 4, 4), b, dtype=torch.uint8)
        yield views, torch.tensor([0, 1]), torch.tensor([2 * b, 2 * b + 1])


class Loader:
    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return loader_of(self.n, self.fail_at)


class RecordingStreams(HostOnly):
    """Stand-in for CudaStreams: notes which thread did what, in order."""

    def __init__(self) -> None:
        self.log, self.lock, self.events = [], threading.Lock(), itertools.count()

    def note(self, *what) -> None:
        with self.lock:
            self.log.append((threading.current_thread().name, *what))

    def enter_thread(self) -> None:
        self.note("enter")

    def producing(self):
        self.note("producing")
        return nullcontext()

    def start(self) -> None:
        self.note("start")

    def record(self) -> int:
        event = next(self.events)
        self.note("record", event)
        return event

    def hand_over(self, event, tensors) -> None:
        self.note("hand_over", event, [id(t) for t in tensors])


def test_batches_are_the_loaders_in_order():
    got = list(DevicePrefetcher(Loader(5), "cpu"))
    assert len(DevicePrefetcher(Loader(5), "cpu")) == 5
    for b, (views, labels, index) in enumerate(got):
        assert torch.equal(views, torch.full((2, 3, 4, 4), b, dtype=torch.uint8))
        assert labels.tolist() == [0, 1] and index.tolist() == [2 * b, 2 * b + 1]


def test_the_thread_prepares_and_the_loop_waits_for_each_batch_before_using_it():
    streams, read = RecordingStreams(), {}

    def read_ahead(index):
        rows = index.float()[:, None]
        read[int(index[0])] = rows
        streams.note("read_ahead", int(index[0]))
        return [rows]

    seen = []
    for views, _, index in DevicePrefetcher(Loader(4), "cpu", read_ahead, streams=streams):
        b = int(index[0]) // 2
        streams.note("consume", b)
        handed = [e for e in streams.log if e[1] == "hand_over" and e[2] == b][0]
        assert handed[3] == [id(views), id(read[2 * b])]  # every tensor that crosses: the views and the rows
        seen.append(b)
    assert seen == [0, 1, 2, 3]
    producer = [e[1:] for e in streams.log if e[0] == "prefetch"]
    assert producer[:3] == [("enter",), ("producing",), ("start",)]  # the side stream waits once, first
    assert [e for e in producer if e[0] != "read_ahead"][3:] == [("record", b) for b in range(4)]
    consumer = [e[1:3] for e in streams.log if e[0] == threading.current_thread().name]
    assert consumer == [x for b in range(4) for x in (("hand_over", b), ("consume", b))]
    order = [e[1:3] for e in streams.log]
    for b in range(4):  # batch b: read ahead and recorded in the thread before the loop waits on it
        assert order.index(("read_ahead", 2 * b)) < order.index(("record", b)) < order.index(("hand_over", b))


def test_batch_t_plus_1_is_prepared_while_batch_t_trains():
    prepared = []

    def read_ahead(index):
        prepared.append(int(index[0]) // 2)
        return []

    for _, _, index in DevicePrefetcher(Loader(3), "cpu", read_ahead, depth=1):
        b = int(index[0]) // 2
        deadline = time.monotonic() + 10
        while b + 1 < 3 and b + 1 not in prepared and time.monotonic() < deadline:
            time.sleep(0.01)  # "training" batch b
        assert b + 1 >= 3 or b + 1 in prepared, f"batch {b + 1} was not made ready while batch {b} trained"


def test_an_error_in_the_thread_reaches_the_loop_with_its_sentence():
    got = []
    with pytest.raises(DataError, match=r"cannot read image 'img2\.jpg'"):
        for _, _, index in DevicePrefetcher(Loader(5, fail_at=2), "cpu"):
            got.append(int(index[0]))
    assert got == [0, 2]


def test_leaving_the_loop_early_ends_the_thread():
    batches = iter(DevicePrefetcher(Loader(50), "cpu", depth=1))
    next(batches)
    batches.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


# ============ crops resized together ============
def random_crops(n: int, seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for _ in range(n):
        h, w = rng.randint(12, 90), rng.randint(12, 90)
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        bh, bw = rng.randint(3, h), rng.randint(3, w)
        boxes.append((rng.randint(0, w - bw), rng.randint(0, h - bh), bw, bh))
    return images, boxes, [rng.random() < 0.5 for _ in range(n)]


def test_crops_resized_together_equal_torchs_antialiased_resize_one_by_one():
    """The batched products give per-image F.interpolate(antialias=True) rounded, up to float32 summation order:
    a pixel may differ only where the exact value sits on a rounding tie (x.5)."""
    size = 24
    images, boxes, flips = random_crops(30, seed=4)
    out = torch.zeros(30, 3, size, size, dtype=torch.uint8)
    slots = list(range(29, -1, -1))  # results land at their slot
    groups = DD.crop_groups(boxes, budget=300_000)
    assert len(groups) > 2 and sorted(i for g in groups for i in g) == list(range(30))
    DD.resize_crops(images, boxes, flips, size, out, slots, budget=300_000)
    for i, (img, (left, top, w, h)) in enumerate(zip(images, boxes, strict=True)):
        exact = F.interpolate(img[None, :, top : top + h, left : left + w].double(), size=(size, size),
                              mode="bilinear", antialias=True, align_corners=False)[0]  # fmt: skip
        exact = exact.flip(-1) if flips[i] else exact
        ref = exact.round().clamp(0, 255)
        diff = (out[slots[i]].double() - ref).abs()
        assert diff.max() <= 1
        ties = (exact - exact.floor() - 0.5).abs() < 1e-3
        assert bool((diff == 0)[~ties].all()), i  # every pixel away from a tie is exact


def test_weights_are_torchs_antialiased_filter():
    """Row o of aa_weights applied to a signal equals F.interpolate's output pixel o (down- and upscaling)."""
    for n in (7, 24, 100, 333):
        signal = torch.rand(1, 1, 1, n, dtype=torch.float64)
        ref = F.interpolate(signal, size=(1, 24), mode="bilinear", antialias=True, align_corners=False)[0, 0, 0]
        w = DD.aa_weights(torch.tensor([n]), 24, n + 5)[0].double()  # (24, n + 5): zeros past n
        assert torch.all(w[:, n:] == 0) and torch.allclose(w.sum(1), torch.ones(24, dtype=torch.float64))
        torch.testing.assert_close(w[:, :n] @ signal[0, 0, 0], ref, rtol=0, atol=1e-5)


def test_device_decode_waits_for_an_idle_stream_before_nvjpeg(monkeypatch):
    """nvJPEG does not wait for the stream its outputs are allocated on: the stream must be idle first."""
    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def decode_jpeg(data, mode=None, device=None):
        calls.append(f"decode on {device}")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8)] * len(data)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(DD.torchvision.io, "decode_jpeg", decode_jpeg)
    DD.decode_jpegs([torch.zeros(4, dtype=torch.uint8)] * 2, ["a.jpg", "b.jpg"], torch.device("cuda", 0))
    assert calls == ["synchronize", "decode on cuda:0"]


# ============ on a GPU (tools/gpu_check.sh runs these) ============
def cuda_only(test):
    """Marked ``gpu`` and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(scope="module")
def jpeg_loader(tmp_path_factory):
    """A loader of --decode gpu batches (encoded JPEGs, their boxes and flips) over 24 generated JPEGs."""
    from data.datasets import IndexedImageFolder
    from data.loaders import build_loader
    from data.synthetic import make_jpeg_folder
    from data.transforms import TrainViews

    root = tmp_path_factory.mktemp("jpegs")
    make_jpeg_folder(str(root), 24, n_classes=3, size=(96, 72))
    dataset = IndexedImageFolder(str(root / "train"), TrainViews(32, True, True, False, decode="gpu"))
    return build_loader(dataset, 8, num_workers=1, seed=1, pin_memory=torch.cuda.is_available())


@cuda_only
def test_cuda_prefetched_batches_equal_the_batches_decoded_in_the_loop(jpeg_loader):
    """The side stream, the event and record_stream hand over exactly what decoding in the loop gives."""
    dev = torch.device("cuda")
    jpeg_loader.sampler.set_epoch(3)
    inline = [(b.decode(dev), i) for b, _, i in jpeg_loader]
    prefetched = [(v, i) for v, _, i in DevicePrefetcher(jpeg_loader, dev)]
    assert len(prefetched) == len(inline) == 3
    for (a, ia), (b, ib) in zip(inline, prefetched, strict=True):
        assert torch.equal(ia, ib) and b.device.type == "cuda"
        # cuBLAS may pick another kernel on another stream: a rounding tie may flip; a race would not be this small
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3


@cuda_only
def test_nvjpeg_never_writes_memory_that_queued_work_still_reads():
    """pytorch/vision#9606: a block freed while a kernel still queued reads it must not receive decoded pixels."""
    import torchvision

    dev = torch.device("cuda")
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    jpeg = torchvision.io.encode_jpeg(image)
    for _ in range(20):
        x = torch.full((3 * 120 * 160,), 7, dtype=torch.uint8, device=dev)  # a decoded image's size: reusable
        torch.cuda._sleep(20_000_000)  # queued work ahead of the read below
        y = x.clone()  # reads x only after the sleep
        del x  # its block is free for the next allocation on this stream
        decoded = DD.nvjpeg_decode([jpeg], dev)[0]
        assert decoded.shape == (3, 120, 160) and bool((y == 7).all())


@cuda_only
def test_cuda_crops_resized_together_equal_the_per_image_kernel():
    """On CUDA the batched products give the per-image float kernel's pixels (the path before), up to ties."""
    dev, size = torch.device("cuda"), 24
    images, boxes, flips = random_crops(40, seed=9)
    out = torch.zeros(40, 3, size, size, dtype=torch.uint8, device=dev)
    DD.resize_crops([im.to(dev) for im in images], boxes, flips, size, out, list(range(40)))
    for i, (img, box) in enumerate(zip(images, boxes, strict=True)):
        ref = DD.resize_crop_uint8(img.to(dev), box, size)
        ref = ref.flip(-1) if flips[i] else ref
        assert (out[i].int() - ref.int()).abs().max() <= 1
        assert (out[i] != ref).float().mean() < 0.01
