"""Checkpoints under evaluation: authors' and CompRess students, ours, heads, teachers, strict keys."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from torch import nn

from models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from models.io import CheckpointError
from models.pretrained import head_layout, load_eval_model, random_init_model
from models.simreg import build_head

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _weights(seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18")
    for m in backbone.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return backbone.state_dict(), build_head(512, 64, 4).eval()


def _torchvision_features(sd: dict) -> torch.Tensor:
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(sd)
    net.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return net((X - mean) / std)


def test_authors_student_gives_torchvision_features(tmp_path):
    sd, head = _weights()
    raw = {f"encoder_q.module.{k}": v for k, v in sd.items()}
    raw.update({f"predict_q.module.{k}": v for k, v in head.state_dict().items()})
    path = tmp_path / "simreg_r18.pth"
    opt = argparse.Namespace(arch_student="resnet18", n_mlp_layers=4)
    torch.save({"opt": opt, "state_dict": raw, "optimizer": {}, "epoch": 130}, path)
    model = load_eval_model(str(path))
    assert model.identity["format"] == "simreg_original" and model.identity["epoch"] == 130
    assert len(model.identity["weights_sha256"]) == 64
    assert torch.allclose(model(X), _torchvision_features(sd), atol=1e-6, rtol=0)
    pred = load_eval_model(str(path), use_pred=True)
    assert pred.feat_dim == 64
    with torch.no_grad():
        assert torch.allclose(pred(X), head(_torchvision_features(sd)), atol=1e-5, rtol=0)


def test_compress_student_and_plain_state_dict(tmp_path):
    sd, _ = _weights(1)
    path = tmp_path / "compress.pth"
    model_sd = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"opt": argparse.Namespace(student_arch="resnet18"), "model": model_sd, "epoch": 4}, path)
    model = load_eval_model(str(path))
    assert (model.identity["format"], model.arch, model.identity["epoch"]) == ("compress", "resnet18", 4)
    assert torch.allclose(model(X), _torchvision_features(sd), atol=1e-6, rtol=0)
    plain = tmp_path / "plain.pth"
    torch.save({**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, plain)
    assert load_eval_model(str(plain)).identity["format"] == "torchvision"
    teacher = load_eval_model(str(plain), as_teacher=True)
    assert teacher.identity["kind"] == "teacher"
    assert torch.allclose(teacher(X), model(X), atol=1e-6, rtol=0)


def test_missing_backbone_key_and_wrong_arch_are_errors(tmp_path):
    sd, _ = _weights()
    del sd["layer4.1.bn2.running_var"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing 1 key"):
        load_eval_model(str(path), arch="resnet18")
    sd, _ = _weights()
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="holds a resnet18 backbone, but --arch is resnet50"):
        load_eval_model(str(path), arch="resnet50")


def test_our_checkpoint_head_and_exported_backbone(tmp_path):
    sd, head = _weights()
    ckpt = {"version": 1, "epoch": 7, "args": {"arch_student": "resnet18", "n_mlp_layers": 4}, "student": sd}
    torch.save({**ckpt, "head": head.state_dict()}, tmp_path / "ckpt_epoch_7.pth")
    model = load_eval_model(str(tmp_path / "ckpt_epoch_7.pth"), use_pred=True)
    assert model.identity["format"] == "simreg" and model.identity["epoch"] == 7
    with torch.no_grad():
        assert torch.allclose(model(X), head(_torchvision_features(sd)), atol=1e-5, rtol=0)
    torch.save(sd, tmp_path / "student_backbone.pth")
    with pytest.raises(CheckpointError, match="holds no prediction head"):
        load_eval_model(str(tmp_path / "student_backbone.pth"), use_pred=True)


def test_head_layouts_are_recognised():
    assert head_layout(build_head(8, 4, 4).state_dict()) == 4
    assert head_layout(build_head(8, 4, 2).state_dict()) == 2
    assert head_layout(build_head(8, 4, 0).state_dict()) == 0
    assert head_layout(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).state_dict()) == -2
    with pytest.raises(CheckpointError, match="no known head layout"):
        head_layout(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).state_dict())


def test_random_init_is_seeded_and_frozen():
    a, b, c = random_init_model("resnet18", 0), random_init_model("resnet18", 0), random_init_model("resnet18", 1)
    assert torch.equal(a(X), b(X)) and not torch.equal(a(X), c(X))
    a.train()
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a.identity["weights_sha256"].startswith("random_init:resnet18:seed0")
