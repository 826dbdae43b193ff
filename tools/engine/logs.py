"""Logging for runs: Python logging (rank 0 INFO, others WARNING), JSON lines, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import sys

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
