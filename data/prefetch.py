"""Loader batches made ready on the training device ahead of the step, off the training thread.

``for views, labels, index in DevicePrefetcher(loader, device, read_ahead)`` gives the loader's batches
with ``views`` already on ``device`` as uint8 (B, 3, H, W) (a pair in the two-view modes). A background
thread takes batch t + 1 from the loader while the training thread queues step t, and makes it ready:
``--decode gpu`` batches are decoded there (nvJPEG, then the batched crop and resize of
:mod:`data.device_decode`), uint8 batches copied from pinned memory without a host wait, and
``read_ahead(index)`` fetches whatever else the step will read by index (a cached teacher's rows,
:mod:`tools.teacher_cache.reader`). The batches, their order and their pixels are the loader's:
prefetching changes when the work happens, never what it computes.

On CUDA that work runs on a side stream, and these rules make the handover safe without any host wait
on the training thread (:class:`CudaStreams`):

- the side stream waits once, when an epoch's thread starts, for the training stream's queued work:
  whatever the side stream reads that the training thread wrote before (a cached teacher's table on
  the device) is complete; during the epoch it reads nothing the training stream writes;
- everything the thread makes is allocated on the side stream, so the caching allocator hands it
  blocks of the side stream's pool only;
- the training stream waits for the side stream's event of batch t before using it (a wait on the GPU,
  not the host), and every tensor that crosses is marked ``record_stream(training stream)``: its block
  goes back to the side stream's pool only once the training stream's work on it is done;
- nvJPEG's own stream does not wait for the side stream, so each decode first waits (in this thread)
  for the side stream to be idle (:func:`data.device_decode.nvjpeg_decode`).

Without CUDA (:class:`HostOnly`) the same thread prepares the batches ahead (decoding on the CPU, the
cached rows' gather from the memory-mapped file) with no stream to order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from data.device_decode import EncodedBatch

END = object()  # the loader is exhausted
STOP_WAIT_S = 30.0  # a loop left early waits this long for the thread (a daemon: it cannot keep the process alive)


@dataclass
class Ready:
    """One batch made ready by the thread: what the step gets, the tensors that cross streams, their event."""

    batch: tuple
    crossing: list[torch.Tensor] = field(default_factory=list)
    event: object = None


@dataclass
class Failed:
    """An exception raised in the thread (an unreadable image, a loader worker's error), raised again in the loop."""

    exc: BaseException


class HostOnly:
    """No streams to order (a CPU run): every hook is a no-op."""

    def enter_thread(self) -> None: ...

    def producing(self):
        return nullcontext()

    def start(self) -> None: ...

    def record(self) -> None:
        return None

    def hand_over(self, event, tensors: list[torch.Tensor]) -> None: ...


class CudaStreams:
    """The training thread's stream (current when made) and a side stream for the prefetch thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.consumer = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def enter_thread(self) -> None:
        torch.cuda.set_device(self.device)  # the current device is per thread (the loader's pinning thread too)

    def producing(self):
        return torch.cuda.stream(self.side)

    def start(self) -> None:
        self.side.wait_stream(self.consumer)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def hand_over(self, event: torch.cuda.Event, tensors: list[torch.Tensor]) -> None:
        self.consumer.wait_event(event)
        for t in tensors:
            t.record_stream(self.consumer)


def streams_for(device: torch.device) -> HostOnly | CudaStreams:
    return CudaStreams(device) if device.type == "cuda" else HostOnly()


class DevicePrefetcher:
    """Iterate ``loader`` with each batch made ready on ``device`` by a background thread, ``depth`` batches ahead.

    ``read_ahead(index)`` (optional) is called in the thread with each batch's index tensor (B,) and
    returns the device tensors it made (they cross to the training stream); ``streams`` overrides the
    stream hooks (tests).
    """

    def __init__(
        self,
        loader,
        device: torch.device | str,
        read_ahead: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        depth: int = 2,
        streams=None,
    ) -> None:
        self.loader, self.device, self.read_ahead = loader, torch.device(device), read_ahead
        self.depth, self.streams = max(depth, 1), streams

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int | None:
        return getattr(self.loader, "batch_size", None)

    def __iter__(self) -> Iterator[tuple]:
        if self.streams is None:
            self.streams = streams_for(self.device)  # made once, in the training thread (its current stream)
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(ready, stop), name="prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is END:
                    return
                if isinstance(item, Failed):
                    raise item.exc
                self.streams.hand_over(item.event, item.crossing)
                yield item.batch
        finally:
            stop.set()
            deadline = time.monotonic() + STOP_WAIT_S
            while worker.is_alive() and time.monotonic() < deadline:  # free a thread blocked on a full queue
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            self.streams.enter_thread()
            with torch.no_grad(), self.streams.producing():
                self.streams.start()
                for batch in self.loader:
                    if stop.is_set() or not _put(ready, self._prepare(batch), stop):
                        return
            _put(ready, END, stop)
        except BaseException as exc:  # raised again in the training thread
            _put(ready, Failed(exc), stop)

    def _prepare(self, batch: tuple) -> Ready:
        views, labels, index = batch
        crossing: list[torch.Tensor] = []
        views = self._to_device(views, crossing)
        if self.read_ahead is not None:
            crossing += self.read_ahead(index)
        return Ready((views, labels, index), crossing, self.streams.record())

    def _to_device(self, views, crossing: list[torch.Tensor]):
        if isinstance(views, (list, tuple)):
            return type(views)(self._to_device(v, crossing) for v in views)
        if isinstance(views, EncodedBatch):
            x = views.decode(self.device)
        else:
            x = views.to(self.device, non_blocking=True)  # from the loader's pinned memory: no host wait
        crossing.append(x)
        return x


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item``, giving up when the training loop has stopped reading; whether it was put."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False
