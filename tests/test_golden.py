"""A golden run: the numbers of one tiny CPU distillation run are pinned, so a silent change of behaviour fails.

Every run-versus-run test (resume, DDP, preemption) compares the code with itself; this one compares it
with recorded values: per-epoch losses and learning rates, the BatchNorm running statistics of the backbone
and the prediction head (which nothing else observes during training), and checksums of every parameter.
To re-record deliberately, after a change of behaviour you intend:
    SIMREG_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden.py
and commit tests/golden/tiny_run.json with a sentence saying why the numbers moved.

Why the numbers do not depend on the CPU. The run is ``train_student.py --float64``: both networks and the
loss in float64, and the initial weights drawn in float64 (PyTorch's float32 ``normal_`` is vectorised and its
values depend on the vector width; the float64 one is not). The crops come from PIL on PNG files (integer
arithmetic). Measured on an AMD EPYC with AVX-512, with every kernel family capped in turn
(``ATEN_CPU_CAPABILITY`` default/avx2/avx512, ``MKL_ENABLE_INSTRUCTIONS`` SSE4_2/AVX2, ``ONEDNN_MAX_CPU_ISA``,
1 or 2 threads): the float64 numbers agree within 3e-10 relative, while the same run in float32 moves by 1-3%
and the earlier batch-4 run moved 1.4% even in float64 (BatchNorm over 4 samples amplified rounding).
Batch 8 over 8 steps keeps rounding far below :data:`REL`, and every pinned quantity is continuous (no
1-NN over a handful of images). ``test_golden_run_catches_changes`` checks that the comparison fails for
each change of behaviour it is meant to catch.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torchvision
from torch import nn

import data.transforms as transforms
import models.simreg as simreg
import train_student
from tests.conftest import write_image_folder

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_run.json")
# Rounding moves these numbers by at most 3e-10 relative across kernels and threads (measured, see above);
# the smallest change of behaviour caught below moves one of them by about 1e-5.
REL, ABS = 1e-7, 1e-9


def tiny_run(tmp_path) -> dict:
    """2 epochs of ResNet-18 -> ResNet-18 on 32 random 32 px images, batch 8 (8 steps), the paper's head and
    single weak view, in float64."""
    data = tmp_path / "data"
    if not data.exists():
        write_image_folder(str(data / "train"), per_class=16, seed=0)
    teacher = str(tmp_path / "teacher.pth")
    torch.manual_seed(123)
    with train_student.default_dtype(torch.float64):  # initial weights drawn the same on every CPU
        torch.save(torchvision.models.resnet18().state_dict(), teacher)
    exp = str(tmp_path / "exp")
    argv = [str(data), "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "8", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--single_aug",
            "--weak_weak", "--exp_dir", exp, "--no_resume", "--seed", "0", "--float64"]  # fmt: skip
    train_student.main(train_student.get_args_parser().parse_args(argv))
    with open(os.path.join(exp, "logs", "train_log.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    ckpt = torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    out = {"loss_per_epoch": [e["loss"] for e in epochs], "lr_per_epoch": [e["lr"] for e in epochs]}
    for part, sd in (("backbone", ckpt["student"]), ("head", ckpt["head"])):
        stats = {k: v.double() for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}
        params = [v.double() for k, v in sd.items() if v.is_floating_point() and k not in stats]
        out[f"{part}_running_mean_sum"] = sum(v.sum().item() for k, v in stats.items() if k.endswith("mean"))
        out[f"{part}_running_var_sum"] = sum(v.sum().item() for k, v in stats.items() if k.endswith("var"))
        out[f"{part}_param_sum"] = sum(v.sum().item() for v in params)
        out[f"{part}_param_sq_sum"] = sum(v.pow(2).sum().item() for v in params)
    return out


def mismatches(got: dict, want: dict) -> list[str]:
    """The pinned quantities whose value moved beyond rounding, as 'name: got vs recorded'."""
    bad = []
    for key, value in want.items():
        if key != "how_to_rerecord" and got.get(key) != pytest.approx(value, rel=REL, abs=ABS):
            bad.append(f"{key}: {got.get(key)} vs {value}")
    return bad


def recorded() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


def test_tiny_run_matches_the_recorded_numbers(tmp_path):
    got = tiny_run(tmp_path)
    if os.environ.get("SIMREG_RECORD_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"how_to_rerecord": "SIMREG_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden.py",
                       **got}, f, indent=2)  # fmt: skip
            f.write("\n")
        pytest.skip(f"recorded {GOLDEN}")
    assert mismatches(got, recorded()) == []


# ---------------------------------------------------------------- changes the golden run must catch
def _head_bn_momentum(monkeypatch):
    def build(*args, **kw):
        head = real(*args, **kw)
        for m in head.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = 0.2  # PyTorch's default is 0.1
        return head

    real = simreg.build_head
    monkeypatch.setattr(simreg, "build_head", build)


def _head_layout(monkeypatch):
    def build(in_dim, out_dim, n_layers=4):  # a ReLU between the 2nd and 3rd linear (the paper has none)
        head = real(in_dim, out_dim, n_layers)
        return nn.Sequential(*head[:4], nn.ReLU(), *head[4:])

    real = simreg.build_head
    monkeypatch.setattr(simreg, "build_head", build)


def _lr_schedule(monkeypatch):  # a cosine that reaches 0 at the last epoch (the paper's stops one step short)
    def lr_at(lr, epoch, epochs):
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(1, epochs - 1)))

    monkeypatch.setattr(train_student, "cosine_lr", lr_at)


def _loss_normalisation(monkeypatch):  # the teacher's target left unnormalised
    def loss(pred, target):
        p = nn.functional.normalize(pred, dim=1)
        return (p - target).pow(2).sum(dim=1).mean()

    monkeypatch.setattr(simreg, "regression_loss", loss)


def _weight_decay(monkeypatch):  # no decay on BatchNorm parameters and biases (a common variant)
    def build(params, lr, momentum, weight_decay, device):
        params = list(params)
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

    monkeypatch.setattr(train_student, "build_optimizer", build)


def _view_sampling(monkeypatch):  # torchvision's default crop scale (0.08, 1) instead of the paper's (0.2, 1)
    real = transforms.rrc_box
    monkeypatch.setattr(transforms, "rrc_box", lambda w, h, rng, *args, **kw: real(w, h, rng, (0.08, 1.0)))


CHANGES = {
    "head BatchNorm momentum": _head_bn_momentum,
    "head layout": _head_layout,
    "learning-rate schedule": _lr_schedule,
    "loss normalisation": _loss_normalisation,
    "weight decay": _weight_decay,
    "view sampling": _view_sampling,
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CHANGES))
def test_golden_run_catches_changes(change, tmp_path, monkeypatch):
    CHANGES[change](monkeypatch)
    moved = mismatches(tiny_run(tmp_path), recorded())
    print(f"{change}: {len(moved)} pinned quantities moved, e.g. {moved[:2]}")
    assert moved, f"the golden run does not notice a change of the {change}"
