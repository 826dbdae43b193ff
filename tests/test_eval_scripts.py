"""eval_knn.py and eval_linear.py end to end on a tiny image folder (CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import eval_knn
import eval_linear
from models.backbones import build_backbone
from models.errors import UserError
from models.io import file_sha256
from models.simreg import build_head
from tests.eval_helpers import make_image_folder
from tools.eval.knn import knn_classify

COMMON = ["--resize_size", "16", "--crop_size", "16", "-j", "0", "-b", "8"]


def _checkpoint(path: str, seed: int, epoch: int = 3) -> None:
    torch.manual_seed(seed)
    state = {
        "version": 1,
        "epoch": epoch,
        "args": {"arch_student": "resnet18", "n_mlp_layers": 4},
        "student": build_backbone("resnet18").state_dict(),
        "head": build_head(512, 32, 4).state_dict(),
        "optimizer": {},
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    root = make_image_folder(str(tmp / "data"), {"train": 6, "val": 3}, classes=3, size=16)
    exp = str(tmp / "exp")
    _checkpoint(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), seed=0)
    return root, exp


def _knn(root, *extra):
    return eval_knn.main(eval_knn.get_args_parser().parse_args([root, *COMMON, "-k", "1,5", *extra]))


@pytest.mark.slow
def test_eval_knn_outputs_reuse_and_stale_refusal(setup):
    root, exp = setup
    results = _knn(root, "--exp_dir", exp, "--backend", "torch")
    out = os.path.join(exp, "features")
    assert float(np.loadtxt(os.path.join(out, "nn_1_acc_epoch_003.txt"))) == results["k"][1]["majority"]["top1"]
    assert os.path.isfile(os.path.join(out, "nn_5_acc_epoch_003.txt"))
    saved = json.load(open(os.path.join(out, "knn_results.json")))
    assert set(saved["k"]["5"]) == {"majority", "weighted"} and saved["epoch"] == 3
    feats = np.load(os.path.join(out, "train_feats.npy"))
    assert feats.dtype == np.float16 and feats.shape == (18, 512)
    assert np.load(os.path.join(out, "val_labels.npy")).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    manifest = json.load(open(os.path.join(out, "features_manifest.json")))
    ckpt = os.path.join(exp, "checkpoints", "checkpoint_latest.pth")
    assert manifest["key"]["model"]["weights_sha256"] == file_sha256(ckpt)
    # The numbers are those of a k-NN on the saved features; the faiss backend agrees.
    t = lambda name: torch.from_numpy(np.load(os.path.join(out, name)))  # noqa: E731
    direct = knn_classify(t("train_feats.npy"), t("train_labels.npy"), t("val_feats.npy"), t("val_labels.npy"), (1, 5))
    assert direct["k"] == results["k"]
    assert _knn(root, "--exp_dir", exp, "--use_cache", "--backend", "faiss")["k"] == results["k"]
    # A new checkpoint under the same name: --use_cache refuses the old features, a plain run recomputes.
    _checkpoint(ckpt, seed=1, epoch=4)
    with pytest.raises(UserError, match="computed from another checkpoint"):
        _knn(root, "--exp_dir", exp, "--use_cache")
    _knn(root, "--exp_dir", exp)
    manifest = json.load(open(os.path.join(out, "features_manifest.json")))
    assert manifest["key"]["model"]["weights_sha256"] == file_sha256(ckpt)
    assert os.path.isfile(os.path.join(out, "nn_1_acc_epoch_004.txt"))


def _linear(root, save, *extra):
    argv = [root, *COMMON, "--random_init", "--arch", "resnet18", "--save", save, "--min_crop_scale", "0.5", *extra]
    return eval_linear.main(eval_linear.get_args_parser().parse_args(argv))


@pytest.mark.slow
def test_eval_linear_results_resume_and_cache(tmp_path, setup):
    root, _ = setup
    full = _linear(root, str(tmp_path / "a"), "--epochs", "2")
    assert full["headline"]["epoch"] == 2 and len(full["history"]) == 2
    assert full["best_epoch"]["top1"] >= full["headline"]["top1"]
    saved = json.load(open(tmp_path / "a" / "results.json"))
    assert saved["headline"] == full["headline"]
    assert os.path.isfile(tmp_path / "a" / "train_stats.pt")
    assert os.path.isfile(tmp_path / "features" / "features_manifest.json")  # beside --save, like <exp>/features
    # Interrupted after epoch 1, then the same command with --epochs 2: the same run, bit for bit.
    _linear(root, str(tmp_path / "b"), "--epochs", "1")
    resumed = _linear(root, str(tmp_path / "b"), "--epochs", "2")
    assert resumed["history"] == full["history"]
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["probe"]
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["probe"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Other settings on the same folder are refused rather than mixed.
    with pytest.raises(UserError, match="other settings"):
        _linear(root, str(tmp_path / "b"), "--epochs", "3", "--lr", "0.1")
    cached = _linear(root, str(tmp_path / "a"), "--epochs", "2", "--use_cache", "--no_resume")
    assert cached["headline"]["epoch"] == 2 and cached["settings"]["use_cache"] is True
    # The original's -e/--evaluate: the saved probe on val, no training, the same numbers as its last epoch.
    evaluated = _linear(root, str(tmp_path / "b"), "--epochs", "2", "--evaluate")
    last = resumed["history"][-1]
    assert (evaluated["top1"], evaluated["top5"]) == (last["top1"], last["top5"])
    with pytest.raises(UserError, match="--evaluate: no linear probe checkpoint"):
        _linear(root, str(tmp_path / "c"), "--epochs", "2", "--evaluate")


@pytest.mark.slow
def test_train_student_knn_monitor_logs_each_epoch(tmp_path, setup):
    import train_student

    root, _ = setup
    torch.manual_seed(0)
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "teacher.pth")
    exp = str(tmp_path / "run")
    argv = [root, "--arch_teacher", "resnet18", "--teacher_weights", str(tmp_path / "teacher.pth")]
    argv += ["--single_aug", "--weak_weak", "--image_size", "16", "--epochs", "2", "--batch_size", "6"]
    argv += ["--num_workers", "0", "--device", "cpu", "--exp_dir", exp, "--knn_every", "1"]
    train_student.main(train_student.get_args_parser().parse_args(argv))
    lines = [json.loads(line) for line in open(os.path.join(exp, "logs", "train_log.jsonl"))]
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        # 18 training images: k=20 is left out, k=1 is reported with both votes.
        assert {k for k in line if k.startswith("knn")} == {"knn_top1_k1", "knn_weighted_top1_k1"}
    # The monitor's number is eval_knn's on the final weights (same features, same search), with no size flag:
    # evaluation defaults to the crop the checkpoint was trained at (16 px, resized to 18), as the monitor.
    ckpt = os.path.join(exp, "checkpoints", "checkpoint_latest.pth")
    argv_knn = [root, "--weights", ckpt, "-k", "1", "-j", "0", "-b", "8", "--save", str(tmp_path / "knn")]
    final = eval_knn.main(eval_knn.get_args_parser().parse_args(argv_knn))
    assert final["k"][1]["majority"]["top1"] == lines[-1]["knn_top1_k1"]
    saved = json.load(open(tmp_path / "knn" / "knn_results.json"))
    assert (saved["resize_size"], saved["crop_size"]) == (18, 16)
    # Monitoring changes nothing in training: the same run without it ends with the same weights.
    plain = str(tmp_path / "plain")
    train_student.main(train_student.get_args_parser().parse_args(argv[:-2] + ["--exp_dir", plain]))
    a = torch.load(os.path.join(exp, "checkpoints", "student_backbone.pth"), weights_only=True)
    b = torch.load(os.path.join(plain, "checkpoints", "student_backbone.pth"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
