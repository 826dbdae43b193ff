"""The training engine: optimizer contents, view modes, checkpoints, exact resume, export."""

import argparse
import json
import logging
import os

import pytest
import torch
import torchvision

import train_student
from data.datasets import IndexedImageFolder
from data.loaders import build_loader
from data.transforms import TrainViews
from models.simreg import Student
from models.teachers import load_teacher
from tools.engine import epoch_log
from tools.engine.distributed import DistInfo
from tools.engine.step import StepConfig, build_optimizer


def test_optimizer_holds_exactly_student_and_head_parameters():
    student = Student("resnet18", 2048, 4)
    hp = argparse.Namespace(learning_rate=0.05, sgd_momentum=0.9, weight_decay=1e-4)
    opt = build_optimizer(student.parameters(), hp.learning_rate, hp.sgd_momentum, hp.weight_decay, torch.device("cpu"))
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(map(id, in_opt)))
    assert {id(p) for p in in_opt} == {id(p) for p in student.encoder.parameters()} | {
        id(p) for p in student.head.parameters()
    }
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.05, 0.9, 1e-4, False)


class Spy(torch.nn.Module):
    """Records the tensors it is given; a linear map of the pooled image so gradients flow."""

    def __init__(self, out_dim=4):
        super().__init__()
        self.seen = []
        self.fc = torch.nn.Linear(3, out_dim)

    def forward(self, x):
        self.seen.append(x)
        return self.fc(x.mean(dim=(2, 3)))

    def targets(self, images, indices):
        self.seen.append(images)
        return torch.ones(images.shape[0], 4)


@pytest.mark.parametrize("single", [True, False])
def test_single_view_feeds_one_tensor_to_both_networks(tiny_data, single):
    views = TrainViews(16, single=single, weak_weak=True, weak_strong=False)
    ds = IndexedImageFolder(os.path.join(tiny_data, "train"), views, seed=0)
    loader = build_loader(ds, 4, num_workers=0)
    student, teacher = Spy(), Spy()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    cfg = StepConfig(DistInfo(), None, False, print_freq=100)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_student.train_one_epoch(student, teacher, loader, opt, scaler, 1, cfg)
    assert len(student.seen) == len(teacher.seen) == 4
    for s, t in zip(student.seen, teacher.seen, strict=True):
        assert (s is t) == single
        assert s.shape == (4, 3, 16, 16) and 0.0 <= s.min() and s.max() <= 1.0


def args_for(data, teacher, exp_dir, epochs, **extra):
    argv = [data, "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "8", "--epochs", str(epochs), "--num_workers", "0", "--device", "cpu",
            "--single_aug", "--weak_weak", "--exp_dir", exp_dir, "--print_freq", "1", "--save_freq", "1"]  # fmt: skip
    for k, v in extra.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return train_student.get_args_parser().parse_args(argv)


def test_resume_after_one_epoch_equals_two_epochs_bit_for_bit(tiny_data, resnet18_teacher_file, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, straight, 2))
    train_student.main(args_for(tiny_data, resnet18_teacher_file, split, 1))
    train_student.main(args_for(tiny_data, resnet18_teacher_file, split, 2))  # resumes from the latest
    a = torch.load(os.path.join(straight, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("student", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    lines = [json.loads(ln) for ln in open(os.path.join(split, "logs", "train_log.jsonl"))]
    assert [ln["epoch"] for ln in lines] == [1, 2]


def test_checkpoint_layout_and_export(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "exp")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 1, n_mlp_layers=4))
    ckpt = torch.load(os.path.join(exp, "checkpoints", "ckpt_epoch_1.pth"), weights_only=True)
    assert {"version", "epoch", "args", "student", "head", "optimizer", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict)
    assert "fc.weight" not in ckpt["student"] and "conv1.weight" in ckpt["student"]
    assert not any("teacher" in k or k.startswith("encoder") for k in ckpt["student"])
    assert {k for k in ckpt["head"] if k.endswith("weight")} == {f"{i}.weight" for i in (0, 1, 3, 4, 5, 7)}
    assert "1.running_mean" in ckpt["head"]
    exported = torch.load(os.path.join(exp, "checkpoints", "student_backbone.pth"), weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    with open(os.path.join(exp, "logs", "train_args.json")) as f:
        assert json.load(f)["arch_student"] == "resnet18"


def test_trained_student_can_be_reloaded_as_a_teacher(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "exp")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 1))
    teacher = load_teacher(os.path.join(exp, "checkpoints", "student_backbone.pth"))
    assert teacher.arch == "resnet18" and teacher.feat_dim == 512


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"batch_size": 100}, "fewer than --batch_size"),
        ({"use_cache": True}, "--use_cache and --teacher_feats FILE.npy go together"),
        ({"arch_student": "resnet19"}, "unknown architecture 'resnet19'"),
    ],
)
def test_user_mistakes_are_user_errors(tiny_data, resnet18_teacher_file, tmp_path, extra, message):
    args = args_for(tiny_data, resnet18_teacher_file, str(tmp_path / "e"), 1, **extra)
    with pytest.raises(train_student.UserError, match=message):
        train_student.main(args)


def test_resume_into_a_different_run_is_refused(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "e")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 1))
    with pytest.raises(train_student.UserError, match="different run.*n_mlp_layers"):
        train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 2, n_mlp_layers=2))


def test_resume_with_other_crops_is_refused(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "e")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 1))
    with pytest.raises(train_student.UserError, match=r"different run.*crop scale 0.5-1, no flip"):
        train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 2, min_crop_scale=0.5, no_flip=True))


def test_linear_pred_alias_sets_zero_layers(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "e")
    train_student.main(args_for(tiny_data, resnet18_teacher_file, exp, 1, linear_pred=True))
    ckpt = torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    assert (
        set(ckpt["head"]) >= {"0.weight", "0.running_mean", "1.weight", "1.bias"} and ckpt["args"]["n_mlp_layers"] == 0
    )


# ============ what a run prints: the epoch line with the time left, k-NN on the console, loss per logged step
def test_epoch_line_gives_the_time_left_and_the_knn_numbers(tmp_path, caplog):
    clock = iter([100.0, 160.0, 220.0])  # started at 100 s, epochs 3 and 4 done 60 s apart
    pace = epoch_log.RunClock(start_epoch=3, epochs=12, clock=lambda: next(clock))
    assert pace.epoch_done(3) == "60 s/epoch, about 9 min left"
    assert pace.epoch_done(4) == "60 s/epoch, about 8 min left"
    run = argparse.Namespace(is_main=True, exp_dir=str(tmp_path), epochs=12)
    stats = {
        "epoch": 4,
        "loss": 0.5,
        "lr": 0.04,
        "images_per_s": 800.0,
        "bad_images_skipped": 0,
        "knn_top1_k1": 71.5,
        "knn_weighted_top1_k1": 71.5,
        "knn_top1_k20": 70.25,
        "knn_weighted_top1_k20": 72.0,
    }
    with caplog.at_level(logging.INFO):
        epoch_log.log_epoch(run, train_student.ScalarWriter(None), stats, "60 s/epoch, about 8 min left")
    assert caplog.messages == [
        "epoch 4/12: loss 0.5000, lr 0.04, 800 images/s; 60 s/epoch, about 8 min left",
        "epoch 4 k-NN top-1 on val/: 1-NN 71.50% (weighted vote 71.50%), 20-NN 70.25% (weighted vote 72.00%)",
    ]


def test_tensorboard_gets_the_loss_of_every_logged_step():
    class Writer:
        def __init__(self):
            self.points = []

        def add(self, scalars, step):
            self.points.append((scalars, step))

    writer = Writer()
    epoch_log.log_step(writer, epoch=3, step=20, steps=50, loss=0.25)
    assert writer.points == [({"train/loss_step": 0.25}, 120)]  # the run's step number: 2 epochs of 50, then 20


def test_the_last_line_says_what_the_exported_backbone_loads_into():
    assert epoch_log.loads_into("resnet18") == "loads into torchvision.models.resnet18() without its classifier"
    assert epoch_log.loads_into("timm/resnet10t") == "loads into timm.create_model('resnet10t', num_classes=0)"
