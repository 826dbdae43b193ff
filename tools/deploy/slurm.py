"""SLURM jobs through submitit: one task per GPU, each running the project's command as a child process.

``python -m tools.submit`` is the command (its flags -> a :class:`JobSpec` and an executor); everything
about running a command as a requeueable task is here: which commands can (:func:`check_command`), the
rendezvous, the signals, the requeue.

:class:`TrainingTask` is what submitit runs in every task: it gives the command torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT from SLURM's node list), starts it, and
turns SLURM's signals into the project's save-and-exit:

- the preemption / time-limit signal submitit asks SLURM for (USR2, ``--signal_delay_s`` before the
  end) reaches every task; each forwards SIGTERM to its command, which saves a checkpoint at its next
  step boundary (all ranks agree on the step) and exits 0. On rank 0 submitit then calls
  :meth:`TrainingTask.checkpoint`, which waits for that checkpoint and hands back the same command,
  and requeues the job: the requeued run resumes from the checkpoint, exactly;
- a plain SIGTERM (``scancel``, preemption without the user signal) is forwarded too: the command
  saves and exits, and SLURM decides whether the job comes back.

The command runs in its own session, so only these forwarded signals reach it (SLURM's USR2 would
otherwise end a process that does not handle it); on Linux it is killed if its task dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass

from models.errors import UserError
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.submit")

STOP_SIGNAL = signal.SIGTERM  # what the command gets: tools/engine/signals.py saves at the next step and exits


@dataclass(frozen=True)
class JobSpec:
    """What every task of a job runs: ``python argv...`` in ``cwd``."""

    argv: tuple[str, ...]  # e.g. ("train_student.py", "/data", "--exp_dir", "exp/r18") or ("-m", "tools.embed", ...)
    cwd: str
    python: str = sys.executable
    master_port: int = 0  # 0: derived from the job id
    stop_timeout_s: float = 60.0  # how long a stopping command may take to save before it is killed
    attempt: int = 0  # requeues through checkpoint() so far


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of ``flag`` in a command line (``--flag V`` or ``--flag=V``), or None."""
    for i, word in enumerate(command):
        if word == flag and i + 1 < len(command):
            return command[i + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1 :]
    return None


def check_command(command: list[str]) -> None:
    """The command must be a script or ``-m module`` that exists; a training run must be able to resume."""
    if not command:
        raise UserError("no command to run: give it after --, e.g. -- train_student.py /data --exp_dir exp/r18 ...")
    if command[0] == "-m":
        module = command[1] if len(command) > 1 else ""
        try:
            found = bool(module) and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"-m {module}: no such module here; run from the project's folder")
        return
    if not command[0].endswith(".py"):
        raise UserError(f"the command must start with a Python script or -m module, not '{command[0]}'")
    if not os.path.isfile(command[0]):
        raise UserError(f"script '{command[0]}' does not exist; run from the project's folder or give its path")
    if os.path.basename(command[0]) == "train_student.py":
        for flag in ("--resume", "--no_resume"):
            if any(word == flag or word.startswith(flag + "=") for word in command):
                raise UserError(
                    f"{flag} in a requeueable job would undo the resume after every preemption; drop it (the run "
                    "resumes from its --exp_dir's latest checkpoint)"
                )


def rendezvous_port(job_id: str, attempt: int = 0, fixed: int = 0, restarts: int = 0) -> int:
    """The rendezvous port: ``fixed`` or one derived from the job id, moved on at every (re)start.

    Every task derives the same port without talking to the others; a requeued attempt uses the next
    one, so it never meets the previous attempt's closing sockets or stale peers.
    """
    base = fixed or 20000 + zlib.crc32(job_id.encode()) % 20000
    return base + attempt + restarts


def rank_env(job, spec: JobSpec, environ: dict[str, str]) -> dict[str, str]:
    """The command's environment: ``environ`` plus torchrun's variables for this task of ``job``.

    ``job`` is a ``submitit.JobEnvironment`` (global_rank, local_rank, num_tasks, num_nodes, node,
    hostnames, job_id). As torchrun does, one OpenMP thread per process unless the user chose a number.
    """
    per_node = job.num_tasks // max(job.num_nodes, 1)
    host = "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]
    port = rendezvous_port(str(job.job_id), spec.attempt, spec.master_port, int(environ.get("SLURM_RESTART_COUNT", 0)))
    env = dict(environ)
    env.update(
        RANK=str(job.global_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(per_node),
        GROUP_RANK=str(job.node),
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    if per_node > 1 and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _die_with_parent() -> None:
    """Runs in the command's process before exec: the kernel kills it if its task dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TaskStopped(RuntimeError):
    """The command saved a checkpoint and stopped on SIGTERM; rerunning or requeueing the job resumes it."""


class TrainingTask:
    """One task of a submitit job (submitit calls it; see the module docstring for the signals)."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self._reset()

    def _reset(self) -> None:
        self._child: subprocess.Popen | None = None
        self._done = threading.Event()
        self._stopping: str | None = None
        self._signalled = False

    # Only the spec travels in submitit's pickles (the child process and threads are this run's).
    def __getstate__(self) -> dict:
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        self.spec = state["spec"]
        self._reset()

    def __call__(self) -> dict:
        import submitit

        job = submitit.JobEnvironment()
        setup_logging(None, job.global_rank == 0)
        logging.getLogger("submitit").propagate = False  # it has its own handler: no line twice
        env = rank_env(job, self.spec, dict(os.environ))
        self._install_handlers(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
        log.info("task %d/%d: %s (rendezvous %s:%s, attempt %d)", job.global_rank, job.num_tasks,
                 " ".join(self.spec.argv), env["MASTER_ADDR"], env["MASTER_PORT"], self.spec.attempt)  # fmt: skip
        self._child = subprocess.Popen(
            [self.spec.python, *self.spec.argv], cwd=self.spec.cwd, env=env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip
        threading.Thread(target=self._reap, daemon=True).start()
        if self._stopping is not None:  # the signal came while the command was starting
            self._signal_child()
        try:
            while not self._done.wait(1.0):  # a timed wait: signal handlers run in between
                pass
        finally:
            self._stop_child("the task is ending")
        return self._outcome(job.global_rank)

    def checkpoint(self):
        """submitit's hook on rank 0 at preemption or time-out: let the command save, then requeue it as it was."""
        from submitit.helpers import DelayedSubmission

        self._stop_child("the job is preempted or about to time out")
        log.info("the command has stopped; requeued (unless its time-outs are used up), it resumes from its checkpoint")
        return DelayedSubmission(TrainingTask(dataclasses.replace(self.spec, attempt=self.spec.attempt + 1)))

    # ---------------------------------------------------------------- signals and the child
    def _install_handlers(self, preempt_signal: int) -> None:
        submitit_handler = signal.getsignal(preempt_signal)

        def on_preempt(signum, frame) -> None:
            self._forward("preemption or time-limit signal")
            if callable(submitit_handler):  # rank 0: checkpoint() then requeue; other ranks: nothing more
                submitit_handler(signum, frame)

        signal.signal(preempt_signal, on_preempt)
        signal.signal(signal.SIGTERM, lambda signum, frame: self._forward("SIGTERM"))

    def _forward(self, reason: str) -> None:
        if self._stopping is None:
            self._stopping = reason
            log.warning("%s: asking the command to save a checkpoint and stop", reason)
        self._signal_child()

    def _signal_child(self) -> None:
        # Once: a second signal could reach the command after it saved and restored the default handlers.
        child = self._child
        if child is not None and not self._signalled and not self._done.is_set():
            self._signalled = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, STOP_SIGNAL)

    def _reap(self) -> None:
        self._child.wait()
        self._done.set()

    def _stop_child(self, reason: str) -> None:
        """Forward the stop signal and wait for the command; kill it after ``stop_timeout_s``."""
        if self._child is None or self._done.is_set():
            return
        self._forward(reason)
        if not self._done.wait(self.spec.stop_timeout_s):
            log.warning("the command did not stop within %.0f s; killing it (its last checkpoint is kept)",
                        self.spec.stop_timeout_s)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child.pid, signal.SIGKILL)
            self._done.wait()

    def _outcome(self, rank: int) -> dict:
        code = self._child.returncode
        result = {"rank": rank, "returncode": code, "attempt": self.spec.attempt}
        if self._stopping == "SIGTERM":
            raise TaskStopped(
                f"rank {rank}: stopped by SIGTERM (exit status {code}) after saving; requeue or resubmit to resume"
            )
        if self._stopping is not None:  # not rank 0 (it requeues from the signal handler): rank 0 brings it back
            return {**result, "status": "stopped for requeue"}
        if code != 0:
            raise RuntimeError(f"rank {rank}: '{' '.join(self.spec.argv)}' exited with status {code}; see this log")
        return {**result, "status": "finished"}


# ---------------------------------------------------------------- the executor
def build_executor(
    folder: str,
    cluster: str,
    *,
    nodes: int,
    tasks_per_node: int,
    gpus_per_node: int,
    cpus_per_task: int,
    timeout_min: int,
    name: str,
    max_requeue: int,
    mem_gb: float = 0,
    slurm: dict | None = None,
):
    """A submitit executor for ``cluster`` (``slurm`` or ``local``) with these resources.

    ``slurm``: SLURM-only settings by submitit's names (partition, signal_delay_s, account, qos,
    constraint, comment); empty values are left to the cluster's defaults.
    """
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeue, local_max_num_timeout=max_requeue
    )
    params = {"name": name, "nodes": nodes, "tasks_per_node": tasks_per_node, "gpus_per_node": gpus_per_node,
              "cpus_per_task": cpus_per_task, "timeout_min": timeout_min}  # fmt: skip
    if mem_gb:
        params["mem_gb"] = mem_gb
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in (slurm or {}).items() if v not in (None, "")})
    executor.update_parameters(**params)
    return executor
