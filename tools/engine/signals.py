"""Graceful stop on preemption: SIGTERM (torchrun, Kubernetes) and SIGUSR1 (SLURM's warning signal)."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers that a stop signal arrived; the training loop checks it between steps.

    The handler only sets a flag (it never saves from inside the signal handler), so a checkpoint is
    written at a step boundary with consistent model and optimizer state.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the next step, then exiting", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """Raised after the stop checkpoint is written; the entry point exits cleanly."""
