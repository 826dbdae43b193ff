"""The evaluation scripts' command lines: the original's flags, paths, -k, the summary table."""

from __future__ import annotations

import json
import os

import pytest

import eval_knn
import eval_linear
from models.errors import UserError
from tools.eval.common import exp_dir_of, output_dir, resolve_weights
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
