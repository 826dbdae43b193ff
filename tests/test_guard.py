"""The hang guard (tools/bench/guard.py): a silent command is killed on time with every process it started,
the ones in sessions of their own included (as torchrun starts its workers), and a guard told to stop
kills what it is running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT
from tools.bench.guard import Guard, process_tree

# A command like torchrun: it starts a worker in a new session, prints the worker's pid, then both hang silently.
SILENT_TREE = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent's wait() counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def test_a_silent_command_is_killed_on_time_with_its_worker_in_another_session(tmp_path):
    log = str(tmp_path / "log")
    seen = []
    start = time.monotonic()
    code, seconds = Guard().run([sys.executable, "-c", SILENT_TREE], 3.0, log, lambda line, proc: seen.append(line))
    assert code == "timeout" and 3.0 <= seconds < 8.0 and time.monotonic() - start < 10.0
    worker = int(seen[0])
    assert wait_gone([worker]), "the worker in its own session outlived the guard"
    text = open(log).read()
    assert text.startswith(f"\n$ {sys.executable} -c") and "[exit timeout after" in text


def test_a_command_that_ends_keeps_its_exit_status_and_output(tmp_path):
    log = str(tmp_path / "log")
    code, seconds = Guard().run([sys.executable, "-c", "print('done'); raise SystemExit(3)"], 60, log)
    assert code == 3 and seconds < 30 and "done\n[exit 3 after" in open(log).read()


def test_a_guard_told_to_stop_kills_the_command_it_is_running(tmp_path):
    """An outer ``timeout`` sends SIGTERM to the guard's process: its command's whole tree goes with it."""
    runner = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from tools.bench.guard import Guard
        Guard().install().run([sys.executable, "-c", {SILENT_TREE!r}], 600, {str(tmp_path / "log")!r})
    """)
    guard = subprocess.Popen([sys.executable, "-c", runner])
    deadline = time.monotonic() + 60
    while len(process_tree(guard.pid)) < 3 and time.monotonic() < deadline:  # the guard, the command, its worker
        time.sleep(0.1)
    tree = process_tree(guard.pid)
    assert len(tree) == 3, tree
    os.kill(guard.pid, signal.SIGTERM)
    assert guard.wait(timeout=30) == 128 + signal.SIGTERM
    assert wait_gone(tree[1:]), "the command or its worker outlived the stopped guard"
