"""Entry points as a user runs them: the paper's command line, run.sh end to end, --help."""

import os
import subprocess
import sys

import pytest
import torch
import torchvision

import train_student
from tests.conftest import ROOT


def test_paper_command_line_is_accepted_verbatim():
    # The original release's run.sh flags, in its order.
    argv = ("--base_dir ./ --exp exp_name --arch_teacher resnet50 --arch_student resnet18 --n_mlp_layers 4 "
            "--learning_rate 0.05 --epochs 130 --single_aug --weak_weak --save_freq 10 "
            "--teacher_weights path/to/teacher/weights path/to/imagenet/dataset/root").split()  # fmt: skip
    args = train_student.get_args_parser().parse_args(argv)
    assert (args.data, args.arch_teacher, args.n_mlp_layers, args.epochs) == (
        "path/to/imagenet/dataset/root",
        "resnet50",
        4,
        130,
    )
    assert args.single_aug and args.weak_weak and args.batch_size == 256 and args.weight_decay == 1e-4
    more = "--weak_strong --linear_pred --print_freq 10 --num_workers 4 --dataset imagenet100 --resume x"
    train_student.get_args_parser().parse_args(argv + more.split())


@pytest.mark.slow
def test_help_needs_no_files():
    out = subprocess.run([sys.executable, "train_student.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--teacher_weights" in out.stdout


def test_wrong_data_path_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "train_student.py", str(tmp_path / "nope"), "--teacher_weights", "t.pth",
                          "--exp_dir", str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "data folder" in out.stderr and "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_run_sh_demo_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_DIR=str(tmp_path / "demo_data"), DEMO_EXP=str(tmp_path / "exp"),
               DEMO_TEACHER_EPOCHS="1", DEMO_EPOCHS="2", DEMO_WORKERS="0",
               DEMO_STUDENT="resnet18")  # fmt: skip
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo finished" in out.stdout
    ckpt = tmp_path / "exp" / "checkpoints"
    assert (ckpt / "checkpoint_latest.pth").exists() and (ckpt / "student_backbone.pth").exists()
    sd = torch.load(ckpt / "student_backbone.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert len((tmp_path / "exp" / "logs" / "train_log.jsonl").read_text().splitlines()) == 2
    assert len(list((tmp_path / "demo_data" / "train").glob("*/*.png"))) == 1442
    assert (tmp_path / "exp" / "teacher" / "demo_teacher_timm_resnet10t.pth").is_file()
    # The demo's evaluations: three networks each, in one process per script, then the side-by-side table.
    for script, python_script, column in [("knn_eval.sh", "eval_knn.py", "1-NN"),
                                          ("lin_eval.sh", "eval_linear.py", "cached linear")]:  # fmt: skip
        done = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        headers = [line for line in done.stdout.splitlines() if line.startswith("== ")]
        assert [h.split(":")[0] for h in headers] == [f"== {python_script} {i}/3" for i in (1, 2, 3)]
        lines = done.stdout.splitlines()
        top = next(i for i, line in enumerate(lines) if line.startswith(" ") and column in line)  # the table
        assert [row.split("  ")[0] for row in lines[top + 1 : top + 4]] == [
            "teacher",
            "distilled student",
            "random init",
        ]
