"""Bookkeeping of a training epoch: device-side meters, the partial-epoch record, agreeing to stop."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.errors import UserError
from tools.engine import distributed
from tools.engine.distributed import DistInfo
from tools.engine.signals import StopRequest


@dataclass
class EpochProgress:
    """A partly done epoch: steps done by each rank, loss and image counts summed over ranks.

    ``loss_sum`` is one number, or with several teachers ``[total, teacher 1, ..., teacher K]``.
    """

    step: int = 0
    loss_sum: float | list[float] = 0.0
    images: int = 0


class StopVote:
    """Whether to stop after this step: the same answer on every rank, without a host sync per step.

    One process: as soon as a stop signal arrived. Several: after every step each rank adds its flag to an
    asynchronous all-reduce, and the sum started ``lag`` steps earlier decides (it has long arrived by
    then, so no step waits on the others or on the device). Every rank reads the same sums in the same
    order, so all of them stop after the same step, a few steps after the first rank saw the signal.
    """

    def __init__(self, stop: StopRequest | None, dist_info: DistInfo, lag: int = 2) -> None:
        self.stop, self.dist_info, self.lag = stop, dist_info, lag
        self._pending: deque = deque()

    def __call__(self) -> bool:
        """Call once after every step, on every rank."""
        if self.stop is None:
            return False
        self.stop.log_notices()  # the signal handler's line, into the log file (the handler never logs)
        if not self.dist_info.distributed:
            return self.stop.requested
        self._pending.append(_Ballot(self.stop.requested, self.dist_info.device))
        return len(self._pending) > self.lag and self._pending.popleft().result() > 0

    @property
    def name(self) -> str:
        return self.stop.name if self.stop else "a signal"

    @property
    def exit_status(self) -> int:
        return self.stop.exit_status if self.stop else 0

    def close(self) -> None:
        """Wait for the ballots still in flight (every rank cast the same number)."""
        while self._pending:
            self._pending.popleft().result()


class _Ballot:
    """One rank's stop flag in an asynchronous all-reduce; on CUDA the sum is copied to pinned host memory
    behind an event, so reading it waits for that copy only, not for the steps queued since."""

    def __init__(self, flag: bool, device: torch.device) -> None:
        self.value = torch.full((1,), float(flag), device=device)
        self.work = dist.all_reduce(self.value, async_op=True)
        self.event = None
        if device.type == "cuda":
            self.work.wait()  # the current stream waits for the all-reduce (the host does not)
            self.host = torch.empty(1, pin_memory=True)
            self.host.copy_(self.value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> float:
        if self.event is not None:
            self.event.synchronize()
            return float(self.host[0])
        self.work.wait()
        return float(self.value[0])


class Meters:
    """Loss, step and image counts kept on the device; the first non-finite step is remembered too."""

    def __init__(self, device: torch.device, progress: EpochProgress, names: list[str] | None = None) -> None:
        self.device, self.names = device, names  # names: the loss vector's entries (default: total, per teacher)
        self.loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.step, self.images = progress.step, progress.images
        self.new_images, self.start = 0, time.perf_counter()

    def update(self, loss: torch.Tensor, batch: int) -> None:
        """Add one step's loss: a scalar, or the (K + 1,) vector of a several-teacher step."""
        if self.loss_sum.shape != loss.shape:  # the first several-teacher step of a fresh epoch
            self.loss_sum = self.loss_sum.expand(loss.shape).clone()
        self.step += 1
        bad = (self.first_bad < 0) & ~torch.isfinite(loss).all()
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, self.step), self.first_bad)
        self.loss_sum += loss
        self.images += batch
        self.new_images += batch

    def check(self, epoch: int) -> float:
        """Raise if any step so far gave a non-finite loss; else return this rank's running mean."""
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise UserError(
                f"the loss became NaN or infinite at step {bad} of epoch {epoch}; training stopped and the last good "
                "checkpoint is kept - lower --learning_rate, or try --amp none"
            )
        return self.loss_sum.reshape(-1)[0].item() / max(self.step, 1)

    def reduced(self) -> EpochProgress:
        """The progress summed over ranks (what a mid-epoch checkpoint stores)."""
        images = torch.tensor([float(self.images)], dtype=torch.float64, device=self.device)
        t = distributed.all_reduce_sum(torch.cat([self.loss_sum.reshape(-1), images])).tolist()
        loss_sum = t[0] if self.loss_sum.ndim == 0 else t[:-1]
        return EpochProgress(self.step, loss_sum, int(t[-1]))

    def summary(self, epoch: int) -> dict:
        self.check(epoch)
        seconds = time.perf_counter() - self.start
        t = torch.tensor([float(self.step), float(self.new_images)], dtype=torch.float64, device=self.device)
        steps_all, new_images = distributed.all_reduce_sum(t).tolist()
        sums = self.reduced().loss_sum
        sums = sums if isinstance(sums, list) else [sums]
        names = self.names or ["loss"] + [f"loss_teacher_{k}" for k in range(1, len(sums))]
        losses = {name: v / max(steps_all, 1) for name, v in zip(names, sums, strict=True)}
        return {
            **losses,
            "images_per_s": new_images / seconds,
            "steps": self.step,
            "time_s": seconds,
        }
