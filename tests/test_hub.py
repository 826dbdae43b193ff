"""hubconf.py: torch.hub.load(REPO, "student" | "teacher", source="local", weights=FILE), never a download."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import eval_knn
from models.errors import UserError
from models.pretrained import load_eval_model
from models.teachers import load_teacher
from tests.conftest import ROOT
from tests.eval_helpers import make_image_folder
from tests.ship_helpers import X, write_student_checkpoint
from tools.eval.features import build_eval_dataset


def hub(entry: str, **kwargs):
    return torch.hub.load(ROOT, entry, source="local", **kwargs)


def test_hub_student_features_equal_eval_knn_features(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), {"train": 4, "val": 2})
    ckpt = str(tmp_path / "ckpt_epoch_3.pth")
    write_student_checkpoint(ckpt)
    argv = [data, "--weights", ckpt, "--save", str(tmp_path / "knn"), "-b", "64", "-j", "0", "--device", "cpu",
            "--resize_size", "32", "--crop_size", "32", "-k", "1"]  # fmt: skip
    eval_knn.main(eval_knn.get_args_parser().parse_args(argv))
    saved = np.load(tmp_path / "knn" / "train_feats.npy")  # eval_knn's features: float16, dataset order

    model = hub("student", weights=ckpt)
    dataset = build_eval_dataset(data, "train", 32, 32)  # the same centre crops, in the same order, one batch
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255.0
    with torch.no_grad():
        feats = model(images)
    assert feats.shape == (12, 512) and not model.training
    assert np.array_equal(feats.half().numpy(), saved)


def test_hub_student_head_and_teacher(tmp_path):
    ckpt = str(tmp_path / "ckpt.pth")
    write_student_checkpoint(ckpt)
    with torch.no_grad():
        assert torch.equal(hub("student", weights=ckpt, head=1)(X), load_eval_model(ckpt, use_pred=True)(X))
    torch.manual_seed(5)
    sd = torchvision.models.resnet18().state_dict()
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    moco.update({"module.encoder_q.fc.weight": torch.zeros(128, 512), "module.encoder_q.fc.bias": torch.zeros(128)})
    path = str(tmp_path / "moco.pth.tar")
    torch.save({"state_dict": moco, "epoch": 200, "arch": "resnet18"}, path)
    teacher = hub("teacher", weights=path)
    with torch.no_grad():
        assert teacher.fmt == "moco" and torch.equal(teacher(X), load_teacher(path)(X))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "https://example.com/r18.pth"}, "is a URL; this hub entry never downloads"),
        ({"weights": "missing.pth"}, "'missing.pth' does not exist"),
        ({}, "give the checkpoint as weights=FILE"),
        ({"weights": "x.pth", "head": 0}, "head=0: give the 1-based number"),
    ],
)
def test_hub_refuses_what_is_not_a_local_file(kwargs, message):
    with pytest.raises(UserError, match=message):
        hub("student", **kwargs)
