"""Submit a run to SLURM through submitit: one task per GPU, requeued on preemption, resuming exactly.

    python -m tools.submit --nodes 2 --gpus_per_node 8 --partition learnlab --timeout 72 -- \\
        train_student.py /datasets/imagenet --teacher_weights moco_v2_800ep_pretrain.pth.tar \\
        --arch_student resnet18 --single_aug --weak_weak --exp_dir exp/r18

Everything after ``--`` is the command every task runs (a script, or ``-m module``), exactly as one
would give it to torchrun. The rendezvous comes from SLURM; ``--batch_size`` stays the global batch.
When SLURM preempts the job or its time limit nears, every task has its command save a checkpoint and
stop, and the job is requeued with the same command, which resumes from that checkpoint.
``--cluster local`` runs the same job on this machine (submitit's local executor), e.g. to try it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

from models.errors import UserError
from tools.deploy.optional import require
from tools.deploy.slurm import JobSpec, TrainingTask, build_executor, check_command, flag_value
from tools.engine import cli
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.submit")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        "submit a run to SLURM", usage="python -m tools.submit [options] -- train_student.py ARGS", add_help=add_help
    )
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=cli.positive_int, default=1, help="machines")
    g.add_argument("--gpus_per_node", type=cli.nonneg_int, default=1, help="GPUs per machine (one task each)")
    g.add_argument("--tasks_per_node", type=cli.nonneg_int, default=0,
                   help="processes per machine; default: one per GPU (one without GPUs)")  # fmt: skip
    g.add_argument("--cpus_per_task", type=cli.positive_int, default=10, help="CPU cores per task (data loading)")
    g.add_argument("--mem_gb", type=cli.nonneg_float, default=0, help="memory per machine in GB (0: the default)")
    g.add_argument("--timeout", type=cli.positive_float, default=72.0, help="time limit of one job in hours")
    g = p.add_argument_group("SLURM")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="SLURM node constraint (e.g. volta32gb)")
    g.add_argument("--comment", default=None, help="SLURM comment")
    g.add_argument("--signal_delay_s", type=cli.positive_int, default=120,
                   help="seconds between the stop signal and the time limit (saving must fit in it)")  # fmt: skip
    g.add_argument("--max_requeue", type=cli.nonneg_int, default=3,
                   help="time-outs to requeue after (preemptions: all)")  # fmt: skip
    g = p.add_argument_group("job")
    g.add_argument("--cluster", default="slurm", choices=["slurm", "local"], help="local: submitit's local executor")
    g.add_argument("--job_name", default="simreg", help="job name")
    g.add_argument("--job_dir", default=None, help="submitit's logs and pickles (default: <exp_dir>/submitit/%%j)")
    g.add_argument("--master_port", type=cli.nonneg_int, default=0, help="rendezvous port (0: derived from the job id)")
    g.add_argument("--wait", action="store_true", help="wait for the job to end and report its result")
    cli.add_debug_flag(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the script (or -m module) and its arguments")
    return p


def command_of(args: argparse.Namespace) -> list[str]:
    """The command every task runs: what follows ``--`` (or the first word that is not an option)."""
    return args.command[1:] if args.command[:1] == ["--"] else list(args.command)


def check_args(args: argparse.Namespace) -> None:
    """Flags, the command and the engine, before anything is submitted."""
    check_command(command_of(args))
    require(("submitit",), "tools.submit")
    if args.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError(
            "no SLURM here (sbatch/srun not found); submit from the cluster's login node, or --cluster local"
        )
    if args.cluster == "local" and args.nodes > 1:
        raise UserError(f"--cluster local runs on this machine only: --nodes {args.nodes} needs --cluster slurm")
    if args.master_port and not 1024 <= args.master_port <= 65535 - 64:
        raise UserError(f"--master_port {args.master_port}: choose a port between 1024 and 65471")
    if args.job_dir and os.path.isfile(args.job_dir):
        raise UserError(f"--job_dir '{args.job_dir}' is a file; give a folder")


def job_folder(args: argparse.Namespace) -> str:
    """``--job_dir``, else ``<exp_dir>/submitit/%j`` of the command's ``--exp_dir``, else ``submitit/%j``."""
    if args.job_dir:
        return args.job_dir
    exp_dir = flag_value(command_of(args), "--exp_dir")
    return os.path.join(exp_dir or ".", "submitit", "%j")


def submit(args: argparse.Namespace):
    """The submitted job (a submitit Job)."""
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    executor = build_executor(
        job_folder(args), args.cluster, nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, timeout_min=max(1, round(args.timeout * 60)), name=args.job_name,
        max_requeue=args.max_requeue, mem_gb=args.mem_gb,
        slurm={"partition": args.partition, "signal_delay_s": args.signal_delay_s, "account": args.account,
               "qos": args.qos, "constraint": args.constraint, "comment": args.comment},
    )  # fmt: skip
    # Saving must fit between the signal and the kill; the rest of the delay is the requeue's.
    command = command_of(args)
    spec = JobSpec(tuple(command), os.getcwd(), sys.executable, args.master_port,
                   stop_timeout_s=max(10.0, args.signal_delay_s - 30.0))  # fmt: skip
    job = executor.submit(TrainingTask(spec))
    log.info("submitted job %s: %d node(s) x %d task(s), %s; logs: %s", job.job_id, args.nodes, tasks,
             " ".join(command), job.paths.stderr)  # fmt: skip
    return job


def main(args: argparse.Namespace) -> list | None:
    setup_logging(None, True, args.debug)
    check_args(args)
    job = submit(args)
    if not args.wait:
        return None
    try:
        results = job.results()
    except Exception as exc:  # submitit re-raises the task's failure with its traceback text
        log.error("job %s failed: %s (logs: %s)", job.job_id, str(exc).strip().splitlines()[-1], job.paths.stderr)
        sys.exit(1)
    log.info("job %s finished: %s", job.job_id, results)
    return results


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
