"""A golden run: the numbers of one tiny CPU distillation run are pinned, so a silent change of behaviour fails.

Every run-versus-run test (resume, DDP, preemption) compares the code with itself; this one compares it
with recorded values: per-epoch losses, the final 1-NN of the --knn_every monitor and the BatchNorm
running statistics of the backbone and the prediction head (which nothing else observes during training).
To re-record deliberately, after a change of behaviour you intend:
    SIMREG_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden.py
and commit tests/golden/tiny_run.json with a sentence saying why the numbers moved.

The run goes in a fresh process on one thread with PyTorch's and oneDNN's kernels capped at AVX2
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``): AVX-512 kernels sum in another order, and over two
epochs of batch-4 BatchNorm that moved the first epoch's loss by 0.7% and the 1-NN from 62.5 to 25.0,
so without the cap the numbers would pin the CPU, not the code. x86-64 CPUs without AVX2 ignore the cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train_student
from tests.conftest import ROOT, write_image_folder

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_run.json")
REL = 1e-4  # one thread, fixed seed, pinned kernels: equal across the machines tested so far


def tiny_run(tmp_path) -> dict:
    """2 epochs of ResNet-18 -> ResNet-18 on 16 random 32 px images, batch 4, the paper's head and views."""
    data = tmp_path / "data"
    write_image_folder(str(data / "train"), per_class=8, seed=0)
    write_image_folder(str(data / "val"), per_class=4, seed=1)
    torch.manual_seed(123)
    teacher = str(tmp_path / "teacher.pth")
    torch.save(__import__("torchvision").models.resnet18().state_dict(), teacher)
    exp = str(tmp_path / "exp")
    argv = [str(data), "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "4", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--single_aug",
            "--weak_weak", "--exp_dir", exp, "--knn_every", "2", "--seed", "0"]  # fmt: skip
    train_student.main(train_student.get_args_parser().parse_args(argv))
    with open(os.path.join(exp, "logs", "train_log.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    ckpt = torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)

    def stat_sums(sd: dict, name: str) -> float:
        return sum(v.double().sum().item() for k, v in sd.items() if k.endswith(name))

    return {
        "loss_per_epoch": [e["loss"] for e in epochs],
        "knn_top1_k1": epochs[-1]["knn_top1_k1"],
        "backbone_running_mean_sum": stat_sums(ckpt["student"], "running_mean"),
        "backbone_running_var_sum": stat_sums(ckpt["student"], "running_var"),
        "head_running_mean_sum": stat_sums(ckpt["head"], "running_mean"),
        "head_running_var_sum": stat_sums(ckpt["head"], "running_var"),
    }


# The same kernels on every x86-64 machine this project is tested on (AVX2 with or without AVX-512).
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


def run_pinned(tmp_path) -> dict:
    """:func:`tiny_run` in a fresh process on one thread with the kernels of :data:`PINNED_KERNELS`."""
    out = tmp_path / "got.json"
    code = (
        "import json, pathlib, sys, torch; torch.set_num_threads(1); from tests.test_golden import tiny_run; "
        "pathlib.Path(sys.argv[2]).write_text(json.dumps(tiny_run(pathlib.Path(sys.argv[1]))))"
    )
    env = {**os.environ, **PINNED_KERNELS}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_tiny_run_matches_the_recorded_numbers(tmp_path):
    got = run_pinned(tmp_path)
    if os.environ.get("SIMREG_RECORD_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"how_to_rerecord": "SIMREG_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden.py",
                       **got}, f, indent=2)  # fmt: skip
            f.write("\n")
        pytest.skip(f"recorded {GOLDEN}")
    with open(GOLDEN) as f:
        want = json.load(f)
    assert got["knn_top1_k1"] == want["knn_top1_k1"]
    for key in ("loss_per_epoch", "backbone_running_mean_sum", "backbone_running_var_sum",
                "head_running_mean_sum", "head_running_var_sum"):  # fmt: skip
        assert got[key] == pytest.approx(want[key], rel=REL), key
