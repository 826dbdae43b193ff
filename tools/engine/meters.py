"""Bookkeeping of a training epoch: device-side meters, the partial-epoch record, agreeing to stop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

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


def stop_agreed(stop: StopRequest | None, dist_info: DistInfo, at_sync_point: bool) -> bool:
    """Whether to stop now. Ranks agree at sync points only, so no step waits on the others."""
    if stop is None:
        return False
    if not dist_info.distributed:
        return stop.requested
    if not at_sync_point:
        return False
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=dist_info.device)
    return distributed.all_reduce_sum(flag).item() > 0


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
