"""torchrun, with the project's answers to mistakes and stop signals; one process runs without it.

    python -m tools.launch --nproc_per_node gpu train_student.py /path/to/imagenet ...same flags...
    python -m tools.launch --nproc_per_node gpu -m tools.embed /path/to/images --weights ... --out feats.npy

Every torchrun flag is accepted (``--nnodes``, ``--rdzv_endpoint``, ``--max_restarts``, ...). What differs:

- ``--nproc_per_node gpu`` means every visible GPU, or one process on a machine without any (torchrun
  refuses), and one process on one node runs the command right here, in this process: nothing stands
  between it and the terminal, so a mistake is its one sentence and exit status 2.
- several processes: a mistake the ranks find ends as that same sentence, printed once (by rank 0, or
  read from the failing rank's error file) with exit status 2, not under the launcher's failure report.
- stop signals (Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2) reach every rank once: the ranks save a checkpoint and
  exit (``tools/engine/signals.py``) within ``--shutdown_timeout`` (120 s here, torchrun's 30 s could
  cut a large save short). Ctrl-C is forwarded as SIGTERM: the ranks already got the terminal's Ctrl-C,
  and a second one would mean "abort without saving".

- torchrun's own log lines (its OpenMP note, which rank it sent SIGTERM) are left out unless ``LOGLEVEL`` is
  set; a crash still ends with torchrun's report of the failed ranks. As with torchrun, each process gets
  one OpenMP thread unless ``OMP_NUM_THREADS`` is set.

The shell wrappers (``run.sh``, ``knn_eval.sh``, ``lin_eval.sh``) start every command through it.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

SHUTDOWN_TIMEOUT_S = 120
# What the launcher turns into a stop of its ranks; SIGINT is left to Python (KeyboardInterrupt), so the
# agent stops the ranks with SIGTERM rather than forwarding a second Ctrl-C.
LAUNCHER_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def resolve_nproc(value: str) -> str:
    """``gpu``: the visible CUDA GPUs, at least 1 (one CPU process); other values as torchrun reads them."""
    if value != "gpu":
        return value
    import torch

    return str(max(torch.cuda.device_count(), 1))


def in_process(args) -> bool:
    """One process on one node, no restarts: the command runs here, without torchrun's agent."""
    one_node = str(args.nnodes) in ("1", "1:1")
    return one_node and args.nproc_per_node == "1" and not args.no_python and args.max_restarts == 0


def run_here(args) -> None:
    """Run the script (or ``-m`` module) in this process as ``python`` would."""
    sys.argv = [args.training_script, *args.training_script_args]
    if args.module:
        runpy.run_module(args.training_script, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(args.training_script))
        runpy.run_path(args.training_script, run_name="__main__")


def exit_status(failures: dict) -> int | None:
    """The status for failed ranks that ended the project's way (2: a user mistake, 130: Ctrl-C), after printing
    the mistake's sentence when rank 0 did not; None for a crash (torchrun's report then). Ranks the agent
    stopped with SIGTERM once another had failed do not count."""
    ended = {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM}
    codes = {f.exitcode for f in ended.values()}
    if codes == {130}:
        return 130
    if codes != {2}:
        return None
    if not _said(failures.get(0)):  # rank 0 printed nothing: the first failing rank's sentence (its error file)
        said = [f for f in ended.values() if _said(f)]
        if said:
            print(f"error: {min(said, key=lambda f: f.timestamp).message}", file=sys.stderr, flush=True)
    return 2


def _said(failure) -> bool:
    """Whether a failed rank left a user mistake's sentence in its error file (``tools.engine.cli.report_error``:
    rank 0 prints it first, then writes it)."""
    data = getattr(failure, "error_file_data", None)
    return isinstance(data, dict) and data.get("user_error") is True and isinstance(data.get("message"), str)


def quiet_torchrun() -> None:
    """torchrun's loggers show only a crash's report (``LOGLEVEL``, when set, decides instead)."""
    import logging

    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.nproc_per_node = resolve_nproc(str(args.nproc_per_node))
    if in_process(args):
        return run_here(args)
    if not any(a.split("=")[0] in ("--shutdown_timeout", "--shutdown-timeout") for a in argv):
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    if not any(a.split("=")[0] in ("--signals_to_handle", "--signals-to-handle") for a in argv):
        args.signals_to_handle = LAUNCHER_SIGNALS
    quiet_torchrun()
    try:
        run(args)
    except ChildFailedError as exc:
        status = exit_status(exc.failures)
        if status is None:
            raise
        sys.exit(status)
    except SignalException as exc:  # the ranks were told to stop and had their time to save
        sys.exit(0 if exc.sigval in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2) else 128 + exc.sigval)
    except KeyboardInterrupt:  # Ctrl-C: the ranks got it from the terminal and SIGTERM from the agent
        sys.exit(130)


if __name__ == "__main__":
    main()
