"""Graceful stop: Ctrl-C (SIGINT), SIGTERM (torchrun, Kubernetes, ``timeout``, SLURM's ``scancel`` and time
limit) and SIGUSR1/SIGUSR2 (SLURM's and submitit's warning signals) save a checkpoint and exit.

Such a signal usually reaches the whole process group: a terminal's Ctrl-C, ``timeout``, SLURM. The data
loader's workers ignore it (:func:`data.loaders.ignore_stop_signals`) and are shut down by the main process
once it has saved; the main process only notes the signal here and the training loop saves at the next
step boundary. A second Ctrl-C (a second or more after the first) aborts at once, without saving.

The handler never logs: it may interrupt the main thread inside a logging handler's write to the console
or to train.log, and a buffered file entered again from a signal handler raises ("reentrant call").
It writes its line straight to the console's file descriptor and leaves the log file's copy to the next
step boundary (:meth:`StopRequest.log_notices`).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from tools.engine.logs import FORMAT

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# A launcher that forwards the terminal's Ctrl-C (torchrun) delivers it twice within milliseconds: a second
# SIGINT aborts only when it comes this long after the first, as a person's second Ctrl-C does.
SECOND_CTRL_C_S = 1.0


class StopRequest:
    """Remembers that a stop signal arrived; the training loop checks it between steps.

    The handler only sets a flag (it never saves from inside the signal handler), so a checkpoint is
    written at a step boundary with consistent model and optimizer state.
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # rank 0 says it; the other ranks got the same signal
        self.signum: int | None = None
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}
        self._notices: list[str] = []  # said on the console by the handler, not yet in the log file

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.log_notices()

    def log_notices(self) -> None:
        """Outside the handler (every step boundary): the handler's lines into the log file, not the console
        again (the console handler skips ``file_only`` records)."""
        while self._notices:
            log.log(logging.WARNING if self.announce else logging.DEBUG, self._notices.pop(0),
                    extra={"file_only": True})  # fmt: skip

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._first_sigint is not None and time.monotonic() - self._first_sigint >= SECOND_CTRL_C_S:
                abort_now()
            self._first_sigint = self._first_sigint or time.monotonic()
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            notice = f"received {self.name}: saving a checkpoint at the next step, then exiting{again}"
            if self.announce:
                say_now(notice)
            self._notices.append(notice)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """How the stop was asked for: ``Ctrl-C``, ``SIGTERM``, ... (``a signal to another rank``: not here)."""
        if self.signum is None:
            return "a signal to another rank"
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """0 after a preemption signal (the run was stopped as asked), 130 after Ctrl-C (as shells expect of an
        interrupted command: a wrapper script stops there)."""
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else 0


def say_now(message: str) -> None:
    """A warning line on the console from inside a signal handler: one unbuffered write to file descriptor 2,
    in the log's format, never through logging's buffered streams."""
    line = FORMAT.format(log.makeRecord(log.name, logging.WARNING, __file__, 0, message, None, None)) + "\n"
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:  # a closed console: the log file still gets the line
        pass


def abort_now() -> None:
    """End this process at once, as an unhandled Ctrl-C would (no checkpoint of the current step)."""
    say_now("second Ctrl-C: aborting without saving; the last checkpoint stays")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


class Interrupted(Exception):
    """Raised after the stop checkpoint is written; the entry point exits cleanly."""

    def __init__(self, message: str, exit_status: int = 0) -> None:
        super().__init__(message)
        self.exit_status = exit_status
