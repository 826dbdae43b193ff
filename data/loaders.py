"""Samplers and loaders: deterministic per (seed, epoch), split across ranks, uint8 batches."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Sampler

# What a terminal's Ctrl-C, ``timeout`` or SLURM send to every process of a job, loader workers included.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's start: stop signals are the main process's to act on (it saves a checkpoint, then
    shuts its workers down); a worker killed by one would end the run with a traceback before the save.

    SIGTERM from the main process itself still ends the worker at once, as PyTorch's own worker handler
    does (``multiprocessing`` terminates leftover workers that way at exit): a thread waits for SIGTERM
    and tells the senders apart. Where the system cannot tell (no ``sigwaitinfo``), SIGTERM keeps
    PyTorch's handling.
    """
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending until the thread below takes it
        threading.Thread(target=_exit_on_parents_sigterm, name="sigterm-from-parent", daemon=True).start()


def _exit_on_parents_sigterm() -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(0)


class EpochSampler(Sampler):
    """DistributedSampler-like split that yields ``(index, epoch)`` keys.

    The permutation depends only on (seed, epoch); rank r takes positions r, r + W, r + 2W, ... of it,
    so the first global batch of a W-rank run holds exactly the first ``batch`` indices of the 1-rank
    run. The list is padded by wrapping around to a multiple of W. ``start`` skips the first samples of
    this rank's share (mid-epoch resume).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order += (order * (total // max(len(order), 1) + 1))[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()[self.start :]])

    def __len__(self) -> int:
        return self.per_rank - self.start


def build_loader(
    dataset,
    batch_size: int,
    *,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A loader over ``dataset`` with an :class:`EpochSampler`; ``batch_size`` is per rank.

    ``collate_fn`` defaults to the dataset's transform's ``collate`` when it has one (device decoding
    batches encoded JPEGs, :mod:`data.device_decode`), else PyTorch's default collation. The workers
    ignore stop signals (:func:`ignore_stop_signals`).
    """
    sampler = EpochSampler(len(dataset), rank, world_size, seed, shuffle)
    if collate_fn is None:
        collate_fn = getattr(getattr(dataset, "transform", None), "collate", None)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
