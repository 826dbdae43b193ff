"""Commands run under a hang guard: past its time limit a command is killed with every process it started.

A silent hang (no output at all) is caught: the deadline is checked on a timer while a thread copies the
command's output to the log, not only when a line arrives. The kill reaches the whole process tree, not
only the command's process group: torchrun starts each worker in a session of its own, so a group kill
would leave the workers (and the GPU memory they hold) behind. :class:`Guard` also remembers the
commands still running, so that when the guard's own process is told to stop (SIGTERM from an outer
``timeout``), it kills them before it exits instead of leaving them orphaned.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress

POLL_S = 0.25  # how often the deadline is checked


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``, over all its threads (Linux /proc); [] when it is gone."""
    found = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant still running, parents first."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p not in tree:
            tree.append(p)
            todo += children(p)
    return tree


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``, its descendants and their process groups (never this process's own); the pids found.

    Everything found is stopped first (SIGSTOP), so nothing forks while the tree is read again.
    """
    for p in process_tree(pid):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGSTOP)
    tree = process_tree(pid)
    groups = set()
    for p in tree:
        with suppress(ProcessLookupError):
            groups.add(os.getpgid(p))
    for g in groups - {os.getpgrp()}:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    for p in tree:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    return tree


class Guard:
    """Runs commands with a time limit each; kills what is still running when this process is told to stop."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def install(self, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) -> Guard:
        """On these signals: kill every running command's tree, then exit with 128 + the signal number."""
        for sig in signals:
            signal.signal(sig, self._stop)
        return self

    def _stop(self, signum, frame) -> None:
        self.kill_all()
        os._exit(128 + signum)  # at once: the outer limit is running out, and nothing here is worth saving

    def kill_all(self) -> None:
        for pid in list(self.live):
            kill_tree(pid)

    def run(
        self,
        cmd: list[str],
        limit_s: float,
        log_path: str,
        on_line: Callable[[str, subprocess.Popen], None] | None = None,
        **popen,
    ) -> tuple[int | str, float]:
        """Run ``cmd``, its output appended to ``log_path``; (exit status, or ``"timeout"``; seconds).

        ``on_line(line, process)`` sees every output line (from the copying thread). Past ``limit_s``
        seconds the command's whole tree is killed, whether or not it prints anything.
        """
        start = time.monotonic()
        with open(log_path, "a") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True, **popen)  # fmt: skip
            self.live.add(proc.pid)
            copier = threading.Thread(target=_copy, args=(proc, out, on_line), daemon=True)
            copier.start()
            code = self._wait(proc, start + limit_s)
            self.live.discard(proc.pid)
            copier.join(timeout=5)  # a stray process still holding the pipe must not hold the guard
            seconds = time.monotonic() - start
            out.write(f"[exit {code} after {seconds:.1f} s]\n")
        return code, seconds

    @staticmethod
    def _wait(proc: subprocess.Popen, deadline: float) -> int | str:
        while True:
            try:
                return proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    kill_tree(proc.pid)
                    proc.wait()
                    return "timeout"


def _copy(proc: subprocess.Popen, out, on_line) -> None:
    for line in proc.stdout:
        out.write(line)
        out.flush()
        if on_line is not None:
            on_line(line, proc)
