"""tools.export: every format computes the checkpoint's features, or nothing is written."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torchvision
from torch import nn

from models.backbones import Encoder
from models.pretrained import EvalModel, load_eval_model
from tests.ship_helpers import X, write_student_checkpoint
from tools import export
from tools.deploy.exporters import REL_LIMIT, export_state_dict
from tools.engine.cli import run_cli


@pytest.fixture
def ckpt(tmp_path) -> str:
    path = str(tmp_path / "ckpt_epoch_3.pth")
    write_student_checkpoint(path)
    return path


def run_export(ckpt: str, fmt: str, out: str, *extra: str) -> dict:
    argv = [ckpt, "--format", fmt, "--out", out, "--image_size", "32", *extra]
    return export.main(export.get_args_parser().parse_args(argv))


def features(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_torchvision_export_loads_with_only_the_classifier_missing(ckpt, tmp_path):
    out = str(tmp_path / "r18_tv.pth")
    record = run_export(ckpt, "torchvision", out)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    net.fc = nn.Identity()
    norm = record["input"]["normalisation"]  # what a torchvision user applies before the network
    mean, std = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    assert torch.allclose(features(net.eval(), (X - mean) / std), features(load_eval_model(ckpt)), atol=1e-5)
    assert record["check"]["max_rel"] == 0.0 and not record["input"]["normalisation_inside"]
    assert json.load(open(out + ".json"))["source"]["format"] == "simreg"


def test_a_teacher_file_exports_too(tmp_path):
    """A MoCo checkpoint's backbone comes out under torchvision's names, projection and momentum encoder dropped."""
    torch.manual_seed(3)
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    moco.update({f"module.encoder_k.{k}": v for k, v in sd.items()})
    moco.update({"module.encoder_q.fc.weight": torch.zeros(128, 512), "module.encoder_q.fc.bias": torch.zeros(128)})
    path = str(tmp_path / "moco.pth.tar")
    torch.save({"state_dict": moco, "epoch": 200, "arch": "resnet18"}, path)
    out = str(tmp_path / "moco_tv.pth")
    record = run_export(path, "torchvision", out)
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == sd.keys() and all(torch.equal(exported[k], v) for k, v in sd.items())
    assert record["source"]["kind"] == "teacher" and record["source"]["format"] == "moco"


def test_timm_export_loads_strictly_into_timm(ckpt, tmp_path):
    timm = pytest.importorskip("timm")
    out = str(tmp_path / "r18_timm.pth")
    run_export(ckpt, "timm", out)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_safetensors_round_trips_exactly(ckpt, tmp_path):
    from safetensors.torch import load_file, safe_open

    source = load_eval_model(ckpt)
    out = str(tmp_path / "r18.safetensors")
    run_export(ckpt, "safetensors", out)
    back, original = load_file(out), torch.load(ckpt, weights_only=True)["student"]
    assert back.keys() == original.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in original.items())
    assert torch.equal(features(load_eval_model(out)), features(source))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (meta["arch"], meta["layout"], json.loads(meta["normalisation"])["std"][0]) == ("resnet18", "plain", 0.229)
    # With the head: the authors' layout, read back by the evaluation with --use_pred.
    head_out = str(tmp_path / "r18_head.safetensors")
    run_export(ckpt, "safetensors", head_out, "--with_head")
    head_back = load_file(head_out)
    assert {k.split(".")[0] for k in head_back} == {"encoder_q", "predict_q"}
    with_head = load_eval_model(ckpt, use_pred=True)
    assert torch.equal(features(load_eval_model(head_out, use_pred=True)), features(with_head))


@pytest.mark.slow
def test_onnx_of_a_resnet18_agrees_with_pytorch_in_onnxruntime(ckpt, tmp_path, caplog):
    import onnx
    import onnxruntime

    out = str(tmp_path / "r18.onnx")
    with caplog.at_level(logging.INFO):
        record = run_export(ckpt, "onnx", out, "--with_head")
    assert "onnxruntime" in caplog.text and "max abs difference" in caplog.text
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["features"]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # the batch axis is symbolic
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # a batch size never traced
    ref = features(load_eval_model(ckpt, use_pred=True), x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.shape == (5, 64)
    assert float((got - ref).abs().max()) <= REL_LIMIT * float(ref.abs().max())
    assert record["check"]["max_rel"] <= REL_LIMIT and record["input"]["normalisation_inside"]
    assert record["output"] == "prediction head" and record["input"]["shape"] == ["batch", 3, 32, 32]


def test_the_head_of_teacher_k_of_a_several_teacher_student(tmp_path):
    ckpt = str(tmp_path / "two_teachers.pth")
    write_student_checkpoint(ckpt, teacher_dim=(64, 32))
    out = str(tmp_path / "head2.safetensors")
    record = run_export(ckpt, "safetensors", out, "--with_head", "--head", "2")
    assert record["head"] == 2 and record["feat_dim"] == 32
    assert torch.equal(features(load_eval_model(out, use_pred=True)), features(load_eval_model(ckpt, use_pred=2)))


@pytest.fixture
def timm_ckpt(tmp_path) -> str:
    """A distilled timm student (``--arch_student timm/test_vit``: timm's own small ViT)."""
    pytest.importorskip("timm")
    path = str(tmp_path / "timm_student.pth")
    write_student_checkpoint(path, "timm/test_vit")
    return path


def test_a_timm_student_exports_in_timm_names(timm_ckpt, tmp_path, caplog):
    import timm

    out = str(tmp_path / "vit_timm.pth")
    record = run_export(timm_ckpt, "timm", out)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert record["arch"] == "timm/test_vit" and record["check"]["max_rel"] == 0.0
    st = str(tmp_path / "vit.safetensors")
    run_export(timm_ckpt, "safetensors", st)
    back = load_eval_model(st, arch="timm/test_vit")  # plain timm names: the architecture comes from --arch
    assert torch.equal(features(back), features(load_eval_model(timm_ckpt)))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
        run_cli(export.main, export.get_args_parser().parse_args([timm_ckpt, "--format", "torchvision", "--out", out]))
    assert "timm/test_vit is not a torchvision architecture" in caplog.text and "(or timm)" in caplog.text


@pytest.mark.slow
def test_onnx_of_a_timm_student_agrees_with_pytorch_in_onnxruntime(timm_ckpt, tmp_path):
    import onnxruntime

    out = str(tmp_path / "vit.onnx")
    record = run_export(timm_ckpt, "onnx", out)
    assert record["check"]["max_rel"] <= REL_LIMIT and record["arch"] == "timm/test_vit"
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ref = features(load_eval_model(timm_ckpt), x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert float((got - ref).abs().max()) <= REL_LIMIT * float(ref.abs().max())


@pytest.mark.slow
def test_torchscript_export_reloads_and_agrees(ckpt, tmp_path):
    out = str(tmp_path / "r18.pt")
    record = run_export(ckpt, "torchscript", out)
    loaded = torch.jit.load(out)
    assert torch.allclose(loaded(X), features(load_eval_model(ckpt)), atol=1e-5)
    assert record["check"]["against"] == "torch.jit.load"


@pytest.mark.slow
def test_a_network_of_another_kind_under_the_same_names_is_refused():
    """BYOL's ResNet-50 has torchvision's names but TensorFlow "SAME" padding: torchvision's resnet50 is
    another network, so a file that claimed to be it would give other features."""
    from models.resnet_same import byol_resnet50

    torch.manual_seed(0)
    net = byol_resnet50().eval()
    model = EvalModel(Encoder(net, 2048), None, "resnet50", {"kind": "teacher"})
    with pytest.raises(export.UserError, match="does not compute the network's features: torchvision network vs"):
        export_state_dict(model, "torchvision", 32)


# (how to break a valid command line: ckpt, out -> argv), the sentence
BAD = {
    "head in a torchvision file": (lambda c, o: [c, "--format", "torchvision", "--out", o, "--with_head"],
                                   "holds a backbone only"),
    "out is the checkpoint": (lambda c, o: [c, "--format", "torchvision", "--out", c], "is the checkpoint itself"),
    "no prediction head": (lambda c, o: [o + ".bb", "--format", "onnx", "--out", o, "--with_head"],
                           "holds no prediction head"),
    "no timm twin": (lambda c, o: [o + ".mbv2", "--format", "timm", "--out", o],
                     "timm has no model named 'mobilenet_v2'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_wrong_input_is_one_sentence(ckpt, tmp_path, caplog, case):
    out = str(tmp_path / "out.bin")
    torch.save(torch.load(ckpt, weights_only=True)["student"], out + ".bb")  # an exported backbone: no head
    if case == "no timm twin":
        write_student_checkpoint(out + ".mbv2", "mobilenet_v2")
    breaks, message = BAD[case]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(export.main, export.get_args_parser().parse_args(breaks(ckpt, out)))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]
    assert not os.path.exists(out)


def test_a_missing_optional_package_is_one_sentence(ckpt, tmp_path, caplog, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    args = export.get_args_parser().parse_args([ckpt, "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(export.main, args)
    assert exit_info.value.code == 2
    assert "--format onnx needs the optional package(s) onnxruntime: pip install onnxruntime" in caplog.text
