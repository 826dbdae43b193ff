"""What a training run reports as it goes: the epoch's line in train.log with the time left, its JSON line
in train_log.jsonl, TensorBoard scalars (per logged step and per epoch), and what the exported backbone
loads into."""

from __future__ import annotations

import logging
import os
import time

from models.backbones import is_timm_arch, timm_name
from tools.engine.logs import ScalarWriter, append_json_line

log = logging.getLogger("simreg.train")


class RunClock:
    """The run's pace: the time left, from the mean time of the epochs this process ran."""

    def __init__(self, start_epoch: int, epochs: int, clock=time.monotonic) -> None:
        self.start_epoch, self.epochs, self.clock = start_epoch, epochs, clock
        self.start = clock()

    def epoch_done(self, epoch: int) -> str:
        """``"<mean epoch time>/epoch, about <time> left"`` (or ``"..., the last epoch"``)."""
        elapsed = self.clock() - self.start
        per_epoch = elapsed / (epoch - self.start_epoch + 1)
        left = per_epoch * (self.epochs - epoch)
        return f"{_duration(per_epoch)}/epoch, " + (f"about {_duration(left)} left" if left else "the last epoch")


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3.2 h``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def log_step(writer: ScalarWriter, epoch: int, step: int, steps: int, loss: float) -> None:
    """TensorBoard's ``train/loss_step``: the mean loss since the last logged step, x = the run's step number."""
    writer.add({"train/loss_step": loss}, (epoch - 1) * steps + step)


def log_epoch(run, writer: ScalarWriter, stats: dict, pace: str = "") -> None:
    """One epoch's line in train.log (with the time left), train_log.jsonl and TensorBoard (rank 0)."""
    if not run.is_main:
        return
    append_json_line(os.path.join(run.exp_dir, "logs", "train_log.jsonl"), stats)
    writer.add({"train/loss": stats["loss"], "train/lr": stats["lr"], "train/images_per_s": stats["images_per_s"]},
               stats["epoch"])  # fmt: skip
    log.info("epoch %d/%d: loss %.4f, lr %.4g, %.0f images/s%s", stats["epoch"], run.epochs, stats["loss"],
             stats["lr"], stats["images_per_s"], f"; {pace}" if pace else "")  # fmt: skip
    knn = {k[4:]: v for k, v in stats.items() if k.startswith("knn_")}
    writer.add({f"knn/{k}": v for k, v in knn.items()}, stats["epoch"])
    if knn:  # --knn_every: k-NN top-1 on val/, as eval_knn.py reports it
        ks = [key.split("_k")[-1] for key in knn if key.startswith("top1_k")]
        parts = [f"{k}-NN {knn[f'top1_k{k}']:.2f}% (weighted vote {knn[f'weighted_top1_k{k}']:.2f}%)" for k in ks]
        log.info("epoch %d k-NN top-1 on val/: %s", stats["epoch"], ", ".join(parts))
    terms = {f"train/{k}": v for k, v in stats.items() if k in ("loss_global", "loss_dense")}
    if terms:  # --loss both: its two terms beside their sum
        writer.add(terms, stats["epoch"])
        log.info("epoch %d: global loss %.4f, dense loss %.4f", stats["epoch"], stats["loss_global"],
                 stats["loss_dense"])  # fmt: skip
    per_teacher = {f"train/{k}": v for k, v in stats.items() if k.startswith("loss_teacher_")}
    if per_teacher:  # several teachers: each one's loss beside the weighted total
        writer.add(per_teacher, stats["epoch"])
        log.info("epoch %d per-teacher losses: %s", stats["epoch"], ", ".join(f"{v:.4f}" for v in per_teacher.values()))
    if stats["bad_images_skipped"]:
        log.warning("%d unreadable image(s) skipped so far (--skip_bad_images)", stats["bad_images_skipped"])
    if stats.get("cpu_decoded_images"):
        log.info("--decode gpu: %d image(s) so far were not plain JPEGs (PNG, CMYK, ...) and were decoded on the CPU",
                 stats["cpu_decoded_images"])  # fmt: skip


def loads_into(arch: str) -> str:
    """What the exported backbone's state dict loads into, without its classifier."""
    if is_timm_arch(arch):
        return f"loads into timm.create_model('{timm_name(arch)}', num_classes=0)"
    return f"loads into torchvision.models.{arch}() without its classifier"
