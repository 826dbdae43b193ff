"""Logging for runs: Python logging (rank 0 INFO, others WARNING), JSON lines, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def setup_logging(log_file: str | None = None, is_main: bool = True, debug: bool = False) -> None:
    """Configure the root logger once: console, plus ``log_file`` on rank 0.

    Without ``log_file`` the lines are also kept in memory until :func:`attach_log_file` names the file
    (a command opens its log once its inputs are checked, so a run refused at start-up leaves no folder).
    """
    level = logging.DEBUG if debug else logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):  # only ours: handlers added by others (e.g. pytest) stay
        if getattr(handler, "_simreg", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].addFilter(lambda record: not getattr(record, "file_only", False))
    handlers.append(_Backlog())
    for handler in handlers:
        handler.setFormatter(FORMAT)
        handler._simreg = True
        root.addHandler(handler)
    if log_file:
        attach_log_file(log_file, is_main)


class _Backlog(logging.Handler):
    """The records logged before the log file was named (at most ``limit``), replayed into it."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


def attach_log_file(log_file: str, is_main: bool = True) -> None:
    """Write the log to ``log_file`` from now on (rank 0), starting with the lines logged so far."""
    root = logging.getLogger()
    backlog = next((h for h in root.handlers if isinstance(h, _Backlog)), None)
    if backlog is not None:
        root.removeHandler(backlog)
    if not is_main:
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(FORMAT)
    handler._simreg = True
    for record in backlog.records if backlog is not None else ():
        handler.handle(record)
    root.addHandler(handler)


def append_json_line(path: str, obj: dict) -> None:
    """Append one JSON object as a line (one line per epoch)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


class ScalarWriter:
    """TensorBoard scalars on rank 0; a no-op elsewhere or when tensorboard is not installed."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger(__name__).warning("tensorboard is not installed; no event files written")
                return
            self.writer = SummaryWriter(log_dir)

    def add(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ============ what a training run prints per step and epoch ============
train_log = logging.getLogger("simreg.train")


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
    """One epoch's line in train.log (with the time left), train_log.jsonl and TensorBoard (rank 0); ``run``:
    the :class:`tools.engine.run_state.Run` (its ``is_main``, ``exp_dir`` and ``epochs``)."""
    if not run.is_main:
        return
    append_json_line(os.path.join(run.exp_dir, "logs", "train_log.jsonl"), stats)
    writer.add({"train/loss": stats["loss"], "train/lr": stats["lr"], "train/images_per_s": stats["images_per_s"]},
               stats["epoch"])  # fmt: skip
    train_log.info("epoch %d/%d: loss %.4f, lr %.4g, %.0f images/s%s", stats["epoch"], run.epochs, stats["loss"],
             stats["lr"], stats["images_per_s"], f"; {pace}" if pace else "")  # fmt: skip
    knn = {k[4:]: v for k, v in stats.items() if k.startswith("knn_")}
    writer.add({f"knn/{k}": v for k, v in knn.items()}, stats["epoch"])
    if knn:  # --knn_every: k-NN top-1 on val/, as eval_knn.py reports it
        ks = [key.split("_k")[-1] for key in knn if key.startswith("top1_k")]
        parts = [f"{k}-NN {knn[f'top1_k{k}']:.2f}% (weighted vote {knn[f'weighted_top1_k{k}']:.2f}%)" for k in ks]
        train_log.info("epoch %d k-NN top-1 on val/: %s", stats["epoch"], ", ".join(parts))
    parts = {f"train/{k}": v for k, v in stats.items() if k in ("loss_global", "loss_dense")}
    if parts:  # --loss both: the two terms beside their sum
        writer.add(parts, stats["epoch"])
        train_log.info("epoch %d: global loss %.4f, dense loss %.4f", stats["epoch"], stats["loss_global"],
                 stats["loss_dense"])  # fmt: skip
    per_teacher = {f"train/{k}": v for k, v in stats.items() if k.startswith("loss_teacher_")}
    if per_teacher:  # several teachers: each one's loss beside the weighted total
        writer.add(per_teacher, stats["epoch"])
        train_log.info(
            "epoch %d per-teacher losses: %s", stats["epoch"], ", ".join(f"{v:.4f}" for v in per_teacher.values())
        )
    if stats["bad_images_skipped"]:
        train_log.warning("%d unreadable image(s) skipped so far (--skip_bad_images)", stats["bad_images_skipped"])
    if stats.get("cpu_decoded_images"):
        train_log.info("--decode gpu: %d image(s) so far were not plain JPEGs (PNG, CMYK, ...) and were decoded on "
                       "the CPU", stats["cpu_decoded_images"])  # fmt: skip
