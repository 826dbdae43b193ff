"""The evaluation scripts' command lines: the original's flags, paths, -k, the summary table."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest

import eval_knn
import eval_linear
from models.errors import UserError
from tools.eval.common import exp_dir_of, output_dir, resolve_sizes, resolve_weights
from tools.eval_summary import format_table, read_results


def test_the_papers_commands_parse_verbatim():
    knn = eval_knn.get_args_parser().parse_args(
        "--arch resnet18 --batch-size 512 --epoch 130 -k 1 --weights e/checkpoints/ckpt_epoch_130.pth "
        "--save e/features data".split()
    )
    assert (knn.arch, knn.batch_size, knn.epoch, knn.k, knn.save) == ("resnet18", 512, 130, "1", "e/features")
    assert eval_knn.parse_ks(knn.k) == (1,)
    lin = eval_linear.get_args_parser().parse_args(
        "--arch resnet18 --eval-freq 40 --weights e/checkpoints/ckpt_epoch_130.pth --save e/linear data".split()
    )
    assert (lin.eval_freq, lin.epochs, lin.lr, lin.weight_decay, lin.batch_size) == (40, 40, 0.01, 1e-4, 256)
    assert eval_linear.parse_milestones(lin.lr_schedule, lin.epochs) == (15, 30)
    assert eval_knn.get_args_parser().parse_args(["data"]).k == "1,20"
    assert eval_knn.get_args_parser().parse_args(["data", "--load_cache"]).use_cache


def test_k_values_and_paths():
    assert eval_knn.parse_ks("20,1,20") == (1, 20)
    with pytest.raises(UserError, match="positive integers"):
        eval_knn.parse_ks("0,x")
    assert exp_dir_of(None, "/r/exp/a/checkpoints/ckpt_epoch_10.pth") == "/r/exp/a"
    assert exp_dir_of(None, "/r/teacher.pth") is None
    assert resolve_weights(None, "/r/exp", 10) == "/r/exp/checkpoints/ckpt_epoch_10.pth"
    with pytest.raises(UserError, match="nothing to evaluate"):
        resolve_weights(None, None, None)
    assert output_dir(None, "/r/exp", "features", True) == "/r/exp/features/pred_head"
    assert output_dir("/o", "/r/exp", "linear", False) == "/o"
    with pytest.raises(UserError, match="no output folder"):
        output_dir(None, None, "linear", False)


def test_summary_table(tmp_path):
    os.makedirs(tmp_path / "s" / "features")
    os.makedirs(tmp_path / "s" / "linear")
    knn = {"k": {k: {"majority": {"top1": 89.0}, "weighted": {"top1": 89.5}} for k in ("1", "20")}, "epoch": 30}
    json.dump(knn, open(tmp_path / "s" / "features" / "knn_results.json", "w"))
    lin = {"headline": {"top1": 95.25, "top5": 99.0}, "settings": {"use_cache": False}}
    json.dump(lin, open(tmp_path / "s" / "linear" / "results.json", "w"))
    rows = {"student": read_results(str(tmp_path / "s")), "random init": read_results(str(tmp_path / "none"))}
    assert rows["student"]["1-NN"] == 89.0 and rows["random init"] == {}
    table = format_table(rows).splitlines()
    assert table[0].split() == ["1-NN", "20-NN", "20-NN", "weighted", "linear"]
    assert table[1].split() == ["student", "89.00", "89.00", "89.50", "95.25"]
    assert table[2].split() == ["random", "init", "-", "-", "-", "-"]


def test_summary_shows_the_per_teacher_losses(tmp_path, capsys):
    from tools import eval_summary

    logs = tmp_path / "run" / "logs"
    os.makedirs(logs)
    lines = [{"epoch": 1, "loss": 0.9, "loss_teacher_1": 0.8, "loss_teacher_2": 1.0},
             {"epoch": 2, "loss": 0.5, "loss_teacher_1": 0.4, "loss_teacher_2": 0.6}]  # fmt: skip
    (logs / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert eval_summary.read_losses(str(tmp_path / "run")) == {"loss": 0.5, "teacher 1": 0.4, "teacher 2": 0.6,
                                                               "epoch": 2}  # fmt: skip
    eval_summary.main([f"two teachers={tmp_path / 'run'}"])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split() == ["loss", "teacher", "1", "teacher", "2"]
    assert out[-1].split() == ["two", "teachers", "0.5000", "0.4000", "0.6000"]


def test_summary_takes_a_bare_folder(tmp_path, capsys):
    from tools import eval_summary

    (tmp_path / "run" / "features").mkdir(parents=True)
    knn = {"k": {"1": {"majority": {"top1": 71.5}, "weighted": {"top1": 71.5}}}, "epoch": 3}
    (tmp_path / "run" / "features" / "knn_results.json").write_text(json.dumps(knn))
    eval_summary.main([str(tmp_path / "run")])
    assert capsys.readouterr().out.splitlines()[-1].split() == [str(tmp_path / "run"), "71.50"]


# ============ the centre crop's sizes: the flags, else what the checkpoint was trained at, else ImageNet's
class Model:
    def __init__(self, **identity):
        self.identity = {"kind": "student", **identity}


def sizes(model, crop=None, resize=None):
    args = argparse.Namespace(crop_size=crop, resize_size=resize)
    resolve_sizes(args, model)
    return args.resize_size, args.crop_size


@pytest.mark.parametrize(
    ("identity", "flags", "expected", "says"),
    [
        ({"training": {"image_size": 48}}, {}, (55, 48), "the training crop recorded in the checkpoint"),
        ({"training": {"image_size": 48, "knn_resize_size": 60}}, {}, (60, 48), "recorded in the checkpoint"),
        ({"training": {"image_size": 48, "knn_resize_size": 60}}, {"crop": 32}, (37, 32), "crop: --crop_size"),
        ({"training": {"image_size": 48}}, {"resize": 64}, (64, 48), "recorded in the checkpoint"),
        ({}, {}, (256, 224), "ImageNet's (no training size recorded)"),
        ({"kind": "teacher", "training": None}, {"crop": 64}, (73, 64), "crop: --crop_size"),
        ({}, {"crop": 32, "resize": 32}, (32, 32), "crop: --crop_size"),
    ],
)
def test_evaluation_sizes_default_to_the_training_crop(caplog, identity, flags, expected, says):
    with caplog.at_level(logging.INFO):
        assert sizes(Model(**identity), **flags) == expected
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocessing:")]
    assert len(lines) == 1 and says in lines[0], lines
    assert lines[0].startswith(
        f"preprocessing: resize the shorter side to {expected[0]} px, centre crop {expected[1]} px"
    )


def test_an_exported_backbone_takes_the_size_from_its_runs_train_args(tmp_path, caplog):
    weights = tmp_path / "exp" / "checkpoints" / "student_backbone.pth"
    weights.parent.mkdir(parents=True)
    (tmp_path / "exp" / "logs").mkdir()
    (tmp_path / "exp" / "logs" / "train_args.json").write_text(json.dumps({"image_size": 32, "knn_resize_size": 0}))
    with caplog.at_level(logging.INFO):
        assert sizes(Model(weights=str(weights))) == (37, 32)
    assert f"recorded in {tmp_path / 'exp' / 'logs' / 'train_args.json'}" in caplog.text
    assert sizes(Model(weights=str(tmp_path / "elsewhere.pth"))) == (256, 224)  # no run beside it


def test_a_resize_below_the_default_crop_asks_for_the_crop_too():
    with pytest.raises(UserError, match=r"centre crop 224 px \(ImageNet's .*\) is larger than --resize_size 64; give"):
        sizes(Model(), resize=64)
