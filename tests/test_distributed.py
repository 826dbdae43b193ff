"""Launch environments: torchrun's and SLURM's variables, device binding, the rendezvous address, and
rank 0 deciding where a run resumes (2 gloo processes whose experiment folders are not shared)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.errors import UserError
from models.simreg import Student
from tests.conftest import ROOT
from tools.engine import distributed as D
from tools.engine.meters import EpochProgress
from tools.engine.run_state import Run, resume, run_identity, save_checkpoint
from tools.engine.step import build_optimizer

SRUN_TASK = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "77"}  # fmt: skip


# ============ ranks ============
def test_torchrun_variables_win():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", **SRUN_TASK}
    assert D._env_ranks(env) == (5, 16, 1)


def test_a_task_of_an_srun_step_reads_slurm():
    assert D._env_ranks(SRUN_TASK) == (3, 8, 1)


def test_slurm_ntasks_outside_srun_is_one_process(caplog):
    """An sbatch script or salloc shell has SLURM_NTASKS (and SLURM_PROCID 0) but no peers: no 30-minute wait."""
    batch_script = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77"}
    with caplog.at_level(logging.WARNING):
        assert D._env_ranks(batch_script) == (0, 1, 0)
    assert "SLURM_NTASKS=8 but this process is not a task of an srun step" in caplog.text
    assert D._env_ranks({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)
    assert D._env_ranks({}) == (0, 1, 0)


# ============ devices ============
@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has CUDA with ``n`` visible GPUs (no CUDA call is made by pick_device)."""

    def set_visible(n: int, visible: str | None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return set_visible


def test_every_gpu_visible_uses_the_local_rank(gpus):
    gpus(8, None)
    assert D.pick_device("auto", 5) == torch.device("cuda", 5)
    assert D.pick_device("cuda", 0) == torch.device("cuda", 0)
    assert D.pick_device("cuda:2", 7) == torch.device("cuda", 2)


def test_one_gpu_per_task_uses_the_bound_gpu_at_any_local_rank(gpus, monkeypatch):
    gpus(1, "6")  # srun --gpus-per-task=1: task with SLURM_LOCALID 3 sees only its own GPU
    assert D.pick_device("auto", 3) == torch.device("cuda", 0)
    assert D.pick_device("cuda", 1) == torch.device("cuda", 0)
    gpus(1, None)  # SLURM's cgroups show each task its one device, without CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert D.pick_device("auto", 2) == torch.device("cuda", 0)


def test_too_few_gpus_is_one_sentence(gpus, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    gpus(1, None)  # a one-GPU machine and 2 processes, no launcher binding: they would share the GPU
    with pytest.raises(UserError, match=r"1 CUDA GPU\(s\) visible \(local rank 1: give each process one GPU"):
        D.pick_device("auto", 1)
    gpus(2, "0,1")
    with pytest.raises(UserError, match="local rank 3"):
        D.pick_device("cuda", 3)
    with pytest.raises(UserError, match=r"--device cuda:4: this machine has 2 CUDA GPU\(s\) visible$"):
        D.pick_device("cuda:4", 0)


# ============ the rendezvous address ============
def test_several_machines_without_master_addr_is_one_sentence():
    with pytest.raises(UserError, match="MASTER_ADDR is not set and this run spans 2 machines: export MASTER_ADDR="):
        D.rendezvous_address(SRUN_TASK)
    with pytest.raises(UserError, match="spans 4 machines"):
        D.rendezvous_address({"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8", "RANK": "0"})
    assert D.rendezvous_address({**SRUN_TASK, "MASTER_ADDR": "gpu-a1", "MASTER_PORT": "29611"}) == ("gpu-a1", 29611)
    one_node = {**SRUN_TASK, "SLURM_STEP_NUM_NODES": "1"}
    assert D.rendezvous_address(one_node) == ("127.0.0.1", 29500)


def test_train_student_under_a_two_node_srun_without_master_addr_stops_at_once(tmp_path):
    """The command the user runs: exit status 2 with the sentence, in seconds (it used to wait 30 minutes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": ""})
    start = time.monotonic()
    done = subprocess.run([sys.executable, "train_student.py", str(tmp_path), "--teacher_weights", "t.pth",
                           "--exp_dir", str(tmp_path / "exp"), "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "MASTER_ADDR is not set and this run spans 2 machines" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - start < 60


# ============ rank 0 decides where the run resumes ============
IDENTITY = run_identity({"n_images": 16}, "resnet18/torchvision/fc=False/abc", {"arch_student": "resnet18"})


def make_run(exp_dir: str, identity: dict = IDENTITY, seed: int = 0) -> Run:
    torch.manual_seed(seed)
    student = Student("resnet18", 8, 0)
    optimizer = build_optimizer(student.parameters(), 0.1, 0.9, 1e-4, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Run(exp_dir, student, optimizer, scaler, identity, {}, epochs=5, save_freq=10, is_main=True)


def saved_run(exp_dir: str) -> Run:
    """A run with 2 epochs and 3 steps of the third done, its optimizer holding momentum."""
    run = make_run(exp_dir, seed=1)
    loss = run.student(torch.rand(2, 3, 32, 32)).square().mean()
    loss.backward()
    run.optimizer.step()
    save_checkpoint(run, 3, EpochProgress(step=3, loss_sum=1.5, images=12))
    return run


def _resume_worker(rank: int, store: str, dirs: list[str], identities: list[dict], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        run = make_run(dirs[rank], identities[rank], seed=10 + rank)  # different initial weights per rank
        try:
            epoch, progress = resume(run)
            state = run.optimizer.state_dict()["state"].values()
            result = {"epoch": epoch, "step": progress.step, "weights": run.student.state_dict(),
                      "momentum": [s["momentum_buffer"] for s in state]}  # fmt: skip
        except UserError as exc:
            result = {"error": str(exc)}
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn_resume(tmp_path, dirs: list[str], identities: list[dict]) -> list[dict]:
    out, store = str(tmp_path / "result"), str(tmp_path / f"store_{time.monotonic_ns()}")
    ctx = mp.spawn(_resume_worker, args=(store, dirs, identities, out), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank waited forever for rank 0's decision")
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.distributed
def test_rank0_decides_the_resume_for_ranks_without_the_checkpoint(tmp_path):
    shared_nowhere = [str(tmp_path / "node0"), str(tmp_path / "node1")]  # only rank 0's disk holds a checkpoint
    saved = saved_run(shared_nowhere[0])
    got = spawn_resume(tmp_path, shared_nowhere, [IDENTITY, IDENTITY])
    assert [g["epoch"] for g in got] == [3, 3] and [g["step"] for g in got] == [3, 3]
    expected = saved.student.state_dict()
    for g in got:
        assert all(torch.equal(g["weights"][k], expected[k]) for k in expected)
        assert g["momentum"] and all(m.abs().sum() > 0 for m in g["momentum"])
    assert not os.path.exists(os.path.join(shared_nowhere[1], "checkpoints"))

    other = dict(IDENTITY, arch_student="resnet34")  # rank 0 refuses: every rank stops with its sentence
    refused = spawn_resume(tmp_path, shared_nowhere, [other, other])
    assert [r["error"].split(";")[0] for r in refused] == [refused[0]["error"].split(";")[0]] * 2
    assert "belongs to a different run" in refused[1]["error"]

    broken = [str(tmp_path / "broken"), shared_nowhere[1]]  # rank 0 cannot read its checkpoint: nobody waits
    os.makedirs(os.path.join(broken[0], "checkpoints"))
    with open(os.path.join(broken[0], "checkpoints", "checkpoint_latest.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    failed = spawn_resume(tmp_path, broken, [IDENTITY, IDENTITY])
    assert "checkpoint_latest.pth" in failed[0]["error"] and failed[1]["error"] == failed[0]["error"]
