"""Process-group setup for torchrun, SLURM and plain single-process runs.

torchrun (and ``tools.submit``) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A task
of an ``srun`` step without torchrun reads SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID instead;
the job script must then export MASTER_ADDR (the first node) when the step spans several nodes. A
plain ``python script.py`` is one process, also inside an ``sbatch`` script or ``salloc`` shell whose
SLURM_NTASKS says more: only srun starts the other tasks. NCCL is used on CUDA devices, gloo on CPU, so
the distributed path also runs (and is tested) on CPU.

Device binding: process ``LOCAL_RANK`` uses GPU ``LOCAL_RANK`` when it sees the node's GPUs; when its
launcher bound it to one GPU (``srun --gpus-per-task=1``, ``--gpu-bind``, cgroups: it sees one device,
named by CUDA_VISIBLE_DEVICES or under SLURM) it uses that one, whatever its local rank.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.errors import UserError

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, an srun step's, or one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    # SLURM_NTASKS is the allocation's task count, set in sbatch scripts and salloc shells too, where this
    # process is the only one: only a task of an srun step (SLURM_STEP_NUM_TASKS) has peers to wait for.
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if "SLURM_PROCID" in env and step_tasks > 1:
        return int(env["SLURM_PROCID"]), step_tasks, int(env.get("SLURM_LOCALID", 0))
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        log.warning(
            "SLURM_NTASKS=%s but this process is not a task of an srun step: running as one process "
            "(start the tasks with srun, or with torchrun)",
            env["SLURM_NTASKS"],
        )
    return 0, 1, 0


def _bound_to_one_gpu(env: dict[str, str] | None = None) -> bool:
    """Whether a launcher gave this process its one visible GPU: CUDA_VISIBLE_DEVICES names one device, or
    SLURM shows it one (--gpus-per-task, or cgroups constraining each task to its own device)."""
    env = os.environ if env is None else env
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return len(visible) == 1 or "SLURM_JOB_ID" in env


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU; ``cuda`` gets the local rank's GPU.

    A process that sees one GPU because its launcher bound it there (``srun --gpus-per-task=1``) uses
    it at any local rank.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
        count = torch.cuda.device_count()
        explicit = name[5:].isdigit()
        index = int(name[5:]) if explicit else local_rank
        if not explicit and index >= count == 1 and _bound_to_one_gpu():
            index = 0  # one GPU per task: the launcher already chose this rank's GPU
        if index >= count:
            hint = (
                f" (local rank {local_rank}: give each process one GPU, e.g. srun --gpus-per-task=1, or let every "
                "process see all of the node's GPUs)"
                if not explicit
                else ""
            )
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s) visible{hint}")
        return torch.device("cuda", index)
    if name != "cpu":
        raise UserError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched with several processes; returns this process's place."""
    rank, world_size, local_rank = _env_ranks()
    if world_size > 1:
        rendezvous_address(os.environ)  # a multi-node run without an address fails now, not in 30 minutes
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=_attempt_store(rank, world_size, RENDEZVOUS_TIMEOUT),
            rank=rank,
            world_size=world_size,
            timeout=RENDEZVOUS_TIMEOUT,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, dev)


def _node_count(env: dict[str, str]) -> int:
    """How many machines the run spans, as far as the launcher says (1 when it does not)."""
    if "SLURM_STEP_NUM_NODES" in env:
        return int(env["SLURM_STEP_NUM_NODES"])
    world, local = env.get("WORLD_SIZE"), env.get("LOCAL_WORLD_SIZE")
    if world and local and int(local) > 0:
        return -(-int(world) // int(local))
    return 1


def rendezvous_address(env: dict[str, str]) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT of a multi-process run (127.0.0.1:29500 on one machine when unset).

    Several machines without MASTER_ADDR would each wait 30 minutes on its own 127.0.0.1: that is a
    UserError naming what to export instead.
    """
    nodes = _node_count(env)
    if "MASTER_ADDR" not in env and nodes > 1:
        raise UserError(
            f"MASTER_ADDR is not set and this run spans {nodes} machines: export MASTER_ADDR=<first node's host name> "
            "(e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) and MASTER_PORT in the job script, "
            "or launch with torchrun or python -m tools.submit"
        )
    return env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500))


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, under a prefix per torchrun restart attempt.

    torchrun keeps one store across restarts (--max_restarts); without a prefix, a restarted rank can
    read the previous attempt's addresses of its peers and fail to connect to processes that are gone.
    """
    host, port = rendezvous_address(os.environ)
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0 and not agent_hosts_store, timeout=timeout,
        multi_tenant=not agent_hosts_store,
    )  # fmt: skip
    return dist.PrefixStore(f"simreg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def from_rank0(make, device: torch.device | None = None):
    """``make()`` run on rank 0 only and its result (any picklable value) given to every rank.

    When ``make`` raises on rank 0, every rank raises too (the others would otherwise wait for a value
    that never comes): rank 0 its own exception, the others a :class:`UserError` with its sentence (or a
    RuntimeError naming it, for an exception that is not a user mistake). In one process this is ``make()``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except Exception as exc:  # told to the other ranks first, then raised here
            failure = exc
            box[0] = ("user error" if isinstance(exc, UserError) else "error", f"{type(exc).__name__}: {exc}", str(exc))
    dist.broadcast_object_list(box, src=0, device=device if device is not None and device.type == "cuda" else None)
    if failure is not None:
        raise failure
    if box[0][0] == "user error":
        raise UserError(box[0][2])
    if box[0][0] == "error":
        raise RuntimeError(f"rank 0 failed: {box[0][1]}")
    return box[0][1]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
