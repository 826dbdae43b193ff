"""Beyond one process: torchrun single-node vs two nodes on this machine, and an elastic restart."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv(data, teacher, exp_dir, epochs=2):
    return [data, "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "8", "--epochs", str(epochs), "--num_workers", "0", "--device", "cpu",
            "--single_aug", "--weak_weak", "--exp_dir", exp_dir, "--print_freq", "1"]  # fmt: skip


def weights(exp_dir):
    ckpt = torch.load(os.path.join(exp_dir, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    return ckpt["epoch"], {**ckpt["student"], **{f"head.{k}": v for k, v in ckpt["head"].items()}}


def assert_same_weights(a, b):
    assert a[0] == b[0]
    diff = [k for k in a[1] if not torch.equal(a[1][k], b[1][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture
def data16(tmp_path):
    write_image_folder(str(tmp_path / "data" / "train"), per_class=8)  # 16 images: 2 global steps of 8
    return str(tmp_path / "data")


# One thread per process everywhere: torchrun sets it only for several processes per node, and a
# different thread count changes the order of float sums (equal results need equal orders).
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_two_nodes_equal_one_node_with_two_processes(data16, resnet18_teacher_file, tmp_path):
    one_node, two_nodes = str(tmp_path / "one"), str(tmp_path / "two")
    run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", "train_student.py"]
        + argv(data16, resnet18_teacher_file, one_node))  # fmt: skip
    endpoint = f"127.0.0.1:{free_port()}"
    node = TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", endpoint, "--rdzv_id", "simreg-test", "train_student.py"]  # fmt: skip
    procs = [
        subprocess.Popen(node + argv(data16, resnet18_teacher_file, two_nodes), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert_same_weights(weights(one_node), weights(two_nodes))


CRASHING_WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import train_student
from models import simreg
from tools.engine.cli import run_cli

calls = [0]
original = simreg.regression_loss

def loss_that_kills_rank_1(pred, target):
    # First attempt only: rank 1 dies at the first step of epoch 2 (after epoch 1's checkpoint).
    calls[0] += 1
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1" and calls[0] == 3:
        os._exit(17)
    return original(pred, target)

simreg.regression_loss = loss_that_kills_rank_1
run_cli(train_student.main, train_student.get_args_parser().parse_args())
"""


def test_killed_rank_is_restarted_from_the_last_checkpoint(data16, resnet18_teacher_file, tmp_path):
    straight, restarted = str(tmp_path / "straight"), str(tmp_path / "restarted")
    wrapper = tmp_path / "crashing_train.py"
    wrapper.write_text(CRASHING_WRAPPER.format(root=ROOT))
    run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", "train_student.py"]
        + argv(data16, resnet18_teacher_file, straight, 3))  # fmt: skip
    out = run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", "--max_restarts", "1", str(wrapper)]
              + argv(data16, resnet18_teacher_file, restarted, 3))  # fmt: skip
    log = open(os.path.join(restarted, "logs", "train.log")).read()
    assert "resumed from" in log and "1 epochs done" in log, out.stderr[-3000:]
    assert_same_weights(weights(straight), weights(restarted))
