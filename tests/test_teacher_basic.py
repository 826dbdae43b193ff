"""load_teacher on the first two layouts (torchvision, official MoCo v1/v2) and safe reading."""

import argparse

import pytest
import safetensors.torch
import torch
import torchvision

from models.io import CheckpointError, safe_load
from models.teachers import load_teacher
from tests.conftest import Payload

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def reference_features(net: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """Pooled features of a torchvision ResNet computed independently of the project's code."""
    net.eval()
    x = (x01 - MEAN) / STD
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)


def moco_checkpoint(net: torch.nn.Module, v2: bool = True) -> dict:
    """The official MoCo layout: module.encoder_q/k.*, an fc projection, the queue, optimizer state."""
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")})
    dim = net.fc.in_features
    if v2:
        for enc in ("q", "k"):
            sd[f"module.encoder_{enc}.fc.0.weight"] = torch.randn(dim, dim)
            sd[f"module.encoder_{enc}.fc.0.bias"] = torch.randn(dim)
            sd[f"module.encoder_{enc}.fc.2.weight"] = torch.randn(128, dim)
            sd[f"module.encoder_{enc}.fc.2.bias"] = torch.randn(128)
    else:
        for enc in ("q", "k"):
            sd[f"module.encoder_{enc}.fc.weight"] = torch.randn(128, dim)
            sd[f"module.encoder_{enc}.fc.bias"] = torch.randn(128)
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_torchvision_teacher_features_match_reference(tmp_path, net):
    path = str(tmp_path / "tv.pth")
    torch.save(net.state_dict(), path)
    teacher = load_teacher(path)
    assert (teacher.fmt, teacher.arch, teacher.feat_dim) == ("torchvision", "resnet18", 512)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(teacher(x), reference_features(net, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("v2", [True, False])
def test_moco_teacher_loads_encoder_q_only(tmp_path, net, v2):
    path = str(tmp_path / "moco.pth.tar")
    torch.save(moco_checkpoint(net, v2), path)
    teacher = load_teacher(path, arch="resnet18")
    assert teacher.fmt == "moco"
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(teacher(x), reference_features(net, x), rtol=1e-5, atol=1e-5)


def test_teacher_is_frozen_and_stays_in_eval(tmp_path, net):
    path = str(tmp_path / "tv.pth")
    torch.save(net.state_dict(), path)
    teacher = load_teacher(path)
    parent = torch.nn.ModuleDict({"teacher": teacher, "other": torch.nn.BatchNorm1d(3)})
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    before = teacher.encoder.backbone.bn1.running_mean.clone()
    out = teacher(torch.rand(4, 3, 32, 32))
    assert not out.requires_grad and out.dtype == torch.float32
    assert torch.equal(before, teacher.encoder.backbone.bn1.running_mean)


def test_missing_backbone_key_is_named(tmp_path, net):
    sd = net.state_dict()
    del sd["layer3.1.bn2.running_var"]
    path = str(tmp_path / "broken.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): layer3\.1\.bn2\.running_var"):
        load_teacher(path, arch="resnet18")


def test_wrong_architecture_is_named(tmp_path, net):
    path = str(tmp_path / "r18.pth")
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError, match="holds a resnet18, but --arch_teacher is resnet50"):
        load_teacher(path, arch="resnet50")


def test_unknown_layout_is_one_sentence_with_the_likeliest_fix_first(tmp_path):
    """No layout it resembles (or a .safetensors file): a timm network's file is the likeliest, so its flag first."""
    timm_first = ("a timm model's file needs its name: --arch_teacher timm/<name> (evaluation: --arch); another "
                  "layout: --teacher_format NAME (--help lists them)")  # fmt: skip
    path = str(tmp_path / "odd.pth")
    torch.save({"stem.weird.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(path)
    assert str(info.value) == f"could not recognise the layout of '{path}' (keys stem.weird.weight); {timm_first}"
    path = str(tmp_path / "model.safetensors")  # resembles MoCo's keys, but safetensors files come from timm's hub
    safetensors.torch.save_file({"q_encoder.stem.weight": torch.zeros(3), "queue": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(path)
    keys = "q_encoder.stem.weight, queue"
    assert str(info.value) == f"could not recognise the layout of '{path}' (keys {keys}); {timm_first}"
    assert len(str(info.value)) <= 300


def test_code_running_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_load(path)
    assert not marker.exists()


def test_argparse_namespace_is_allowed(tmp_path):
    path = str(tmp_path / "old.pth")
    torch.save({"opt": argparse.Namespace(arch_student="resnet18"), "epoch": 3}, path)
    assert safe_load(path)["opt"].arch_student == "resnet18"


def test_truncated_file_fails_clearly(tmp_path, net):
    path = tmp_path / "cut.pth"
    torch.save(net.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        safe_load(str(path))


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(str(tmp_path / "nope.pth"), "teacher")
