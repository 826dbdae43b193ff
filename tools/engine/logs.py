"""Logging for runs: Python logging (rank 0 INFO, others WARNING), JSON lines, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import sys


def setup_logging(log_file: str | None = None, is_main: bool = True, debug: bool = False) -> None:
    """Configure the root logger once: console, plus ``log_file`` on rank 0."""
    level = logging.DEBUG if debug else logging.INFO if is_main else logging.WARNING
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):  # only ours: handlers added by others (e.g. pytest) stay
        if getattr(handler, "_simreg", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file and is_main:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._simreg = True
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
