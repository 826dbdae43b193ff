"""tools.submit: the rendezvous from SLURM's variables, one sentence per wrong input, and a preempted job
(submitit's local executor: two processes, gloo) requeued to the same weights as an uninterrupted run."""

from __future__ import annotations

import glob
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, write_image_folder
from tools import submit
from tools.deploy import slurm
from tools.deploy.slurm import JobSpec, TrainingTask, rank_env, rendezvous_port
from tools.engine.cli import run_cli


def test_every_task_gets_torchruns_variables_from_the_job():
    job = SimpleNamespace(global_rank=5, local_rank=1, num_tasks=8, num_nodes=2, node=1, job_id="4242",
                          hostnames=["gpu-a17", "gpu-a18"])  # fmt: skip
    spec = JobSpec(("train_student.py", "/data"), "/work", attempt=2)
    env = rank_env(job, spec, {"PATH": "/bin", "SLURM_RESTART_COUNT": "1"})
    port = rendezvous_port("4242")
    assert 20000 <= port < 40000 and env["MASTER_PORT"] == str(port + 2 + 1)  # a new port per (re)start
    expected = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "MASTER_ADDR": "gpu-a17", "OMP_NUM_THREADS": "1", "PATH": "/bin"}  # fmt: skip
    assert {k: env[k] for k in expected} == expected
    one_node = SimpleNamespace(**{**vars(job), "num_nodes": 1, "num_tasks": 1, "global_rank": 0, "local_rank": 0})
    env = rank_env(one_node, JobSpec((), "/", master_port=29555), {"OMP_NUM_THREADS": "4"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["OMP_NUM_THREADS"]) == ("127.0.0.1", "29555", "4")


def test_only_the_spec_travels_in_submitits_pickle():
    task = TrainingTask(JobSpec(("train_student.py",), "/work"))
    task._stopping = "SIGTERM"
    back = pickle.loads(pickle.dumps(task))
    assert back.spec == task.spec and back._stopping is None and back._child is None


def test_the_command_after_the_separator_is_kept_whole():
    args = submit.get_args_parser().parse_args(["--nodes", "2", "--", "train_student.py", "/d", "--nodes", "5"])
    assert args.nodes == 2 and submit.command_of(args) == ["train_student.py", "/d", "--nodes", "5"]
    assert slurm.flag_value(["x.py", "--exp_dir=exp/a"], "--exp_dir") == "exp/a"
    args = submit.get_args_parser().parse_args(["--", "train_student.py", "--exp_dir", "exp/b"])
    assert submit.job_folder(args) == os.path.join("exp/b", "submitit", "%j")


BAD = {
    "not a script": (["--cluster", "local", "--", "ls", "-l"], "must start with a Python script or -m module"),
    "missing module": (["--cluster", "local", "--", "-m", "tools.nope"], "-m tools.nope: no such module"),
    "no_resume": (["--cluster", "local", "--", "train_student.py", "d", "--no_resume"], "--no_resume in a requeue"),
    "port": (["--cluster", "local", "--master_port", "80", "--", "train_student.py"], "--master_port 80: choose"),
    "no slurm": (["--", "train_student.py"], "no SLURM here (sbatch/srun not found)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_wrong_input_is_one_sentence(case, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    if case == "no slurm":
        monkeypatch.setenv("PATH", "/nonexistent")
    argv, message = BAD[case]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(submit.main, submit.get_args_parser().parse_args(argv))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]


def test_a_missing_submitit_is_one_sentence(caplog, monkeypatch):
    import importlib.util

    monkeypatch.chdir(ROOT)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(submit.main, submit.get_args_parser().parse_args(["--cluster", "local", "--", "train_student.py"]))
    assert exit_info.value.code == 2 and "tools.submit needs the optional package(s) submitit" in caplog.text


# ============ a preempted job, requeued, ends bit for bit where an uninterrupted run ends ============
SLOW_STEPS = """
import sys, time
sys.path.insert(0, {root!r})
import train_student
from models import simreg
from tools.engine.cli import run_cli

original = simreg.regression_loss

def slow_loss(pred, target):  # steps long enough for the test to signal in the middle of the run
    time.sleep(0.4)
    return original(pred, target)

simreg.regression_loss = slow_loss
run_cli(train_student.main, train_student.get_args_parser().parse_args())
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread everywhere: equal float sums need equal orders


def train_argv(data: str, teacher: str, exp_dir: str) -> list[str]:
    return [data, "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--single_aug",
            "--weak_weak", "--exp_dir", exp_dir, "--print_freq", "1"]  # fmt: skip


def final_weights(exp_dir: str) -> dict:
    ckpt = torch.load(os.path.join(exp_dir, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    return {"epoch": ckpt["epoch"], **{f"s.{k}": v for k, v in ckpt["student"].items()},
            **{f"h.{k}": v for k, v in ckpt["head"].items()}}  # fmt: skip


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def wait_for_step(job_dir: str, deadline: float) -> int:
    """The local job's id (its controller's pid) once rank 0's log shows a training step."""
    while time.time() < deadline:
        for log in glob.glob(os.path.join(job_dir, "*_0_log.err")):
            if " step " in open(log).read():
                return int(os.path.basename(log).split("_")[0])
        time.sleep(0.1)
    raise AssertionError("the job never logged a training step")


@pytest.mark.slow
@pytest.mark.distributed
def test_preempted_local_job_is_requeued_and_ends_bit_identical(tmp_path, resnet18_teacher_file):
    pytest.importorskip("submitit")
    data = write_image_folder(str(tmp_path / "data" / "train"), per_class=8)  # 16 images: one epoch, 4 steps of 4
    data = os.path.dirname(data)
    straight, preempted = str(tmp_path / "straight"), str(tmp_path / "preempted")
    reference = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "train_student.py", *train_argv(data, resnet18_teacher_file, straight)]  # fmt: skip
    out = subprocess.run(reference, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(SLOW_STEPS.format(root=ROOT))
    job_dir = str(tmp_path / "jobs")
    cmd = [sys.executable, "-m", "tools.submit", "--cluster", "local", "--gpus_per_node", "0", "--tasks_per_node",
           "2", "--timeout", "0.25", "--job_dir", job_dir, "--wait", "--", str(wrapper),
           *train_argv(data, resnet18_teacher_file, preempted)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        controller = wait_for_step(job_dir, time.time() + 300)
        tasks = children(controller)
        assert len(tasks) == 2, tasks
        for pid in tasks:  # what SLURM does ahead of a preemption or the time limit: USR2 to every task
            os.kill(pid, signal.SIGUSR2)
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    logs = "".join(open(f).read() for f in glob.glob(os.path.join(job_dir, "*_0_log.*")))  # submitit's and ours
    assert "this job is preempted" in logs and "Requeued job" in logs, logs[-3000:]
    train_log = open(os.path.join(preempted, "logs", "train.log")).read()
    assert "stopped by SIGTERM in epoch 1" in train_log and "resumed from" in train_log
    assert "0 epochs done" in train_log  # the stop came in the middle of the first epoch
    a, b = final_weights(straight), final_weights(preempted)
    assert a.keys() == b.keys() and a["epoch"] == b["epoch"] == 1
    differ = [k for k in a if k != "epoch" and not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


FAKE_SBATCH = """#!/bin/sh
cp "$1" {record}
echo "Submitted batch job 4242"
"""


def test_a_slurm_submission_asks_for_one_task_per_gpu_and_the_warning_signal(tmp_path, monkeypatch):
    """Through a stand-in sbatch: the batch script submitit writes, and the task it pickles for every rank."""
    pytest.importorskip("submitit")
    from submitit.core.utils import DelayedSubmission

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(record=tmp_path / "job.sh"))
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)
    job_dir = str(tmp_path / "jobs" / "%j")
    argv = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "learnlab", "--timeout", "72", "--job_dir", job_dir,
            "--", "train_student.py", "/datasets/imagenet", "--exp_dir", "exp/r18"]  # fmt: skip
    args = submit.get_args_parser().parse_args(argv)
    submit.main(args)
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=learnlab", "--signal=USR2@120", "--time=4320"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, script
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    task = DelayedSubmission.load(tmp_path / "jobs" / "4242" / "4242_submitted.pkl").function
    assert isinstance(task, TrainingTask) and task.spec.cwd == ROOT and task.spec.attempt == 0
    assert task.spec.argv == ("train_student.py", "/datasets/imagenet", "--exp_dir", "exp/r18")
    assert task.spec.stop_timeout_s == 90.0  # the 120 s warning minus the requeue's 30 s
