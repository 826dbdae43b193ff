"""Any student, any teacher: every torchvision classification model and timm models by name, local
files only; exports in each ecosystem's own layout; the pipeline (training, evaluation, cache, compile)
with ViT and timm networks."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision

import eval_knn
import train_student
from models.backbones import build_encoder, canonical_arch
from models.errors import UserError
from models.fold import compile_frozen, count_batchnorms
from models.io import CheckpointError
from models.pretrained import load_eval_model, read_student_weights
from models.simreg import Student
from models.teachers import load_teacher
from tests.vit_reference import dinov2_file, reference_vit, vit_weights
from tools import cache_teacher_features


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- students
@pytest.mark.parametrize(
    ("arch", "classifier"),
    [
        ("efficientnet_b0", "classifier.1"),
        ("mobilenet_v3_large", "classifier.3"),
        ("regnet_y_400mf", "fc"),
        ("convnext_tiny", "classifier.2"),
        ("mobilenet_v2", "classifier.1"),
    ],
)
def test_torchvision_students_by_name_export_into_torchvision_with_only_the_classifier_missing(arch, classifier):
    reference = torchvision.models.get_model(arch)
    student = Student(arch, teacher_dim=16)
    assert student.encoder.feat_dim == reference.get_submodule(classifier).in_features  # read from the model
    missing, unexpected = reference.load_state_dict(student.backbone_state_dict(), strict=False)
    assert sorted(missing) == [f"{classifier}.bias", f"{classifier}.weight"] and unexpected == []
    student.eval()
    assert student.encoder(torch.rand(2, 3, 64, 64)).shape == (2, student.encoder.feat_dim)


@pytest.mark.parametrize("arch", ["timm/mobilenetv3_small_050", "timm/vit_tiny_patch16_224", "timm/resnet18"])
def test_timm_students_export_strictly_into_timm(arch):
    student = Student(arch, teacher_dim=16)
    name = arch[len("timm/") :]
    timm.create_model(name, pretrained=False, num_classes=0).load_state_dict(student.backbone_state_dict(), strict=True)
    student.eval()
    assert student(torch.rand(2, 3, 32, 32)).shape == (2, 16)  # ViTs take the training crop size


def test_timm_normalisation_comes_from_the_pretrained_config():
    enc = build_encoder("timm/vit_tiny_patch16_224.augreg_in21k")  # AugReg: mean = std = 0.5
    assert enc.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert build_encoder("timm/resnet18").normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(UserError, match="'timm/not_a_model' is not a timm model"):
        canonical_arch("timm/not_a_model")
    with pytest.raises(UserError, match="unknown architecture 'resnet19'; choose a torchvision classification"):
        canonical_arch("resnet19")


# ---------------------------------------------------------------- timm teachers
@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """A random vit_tiny_patch16_224 with a 10-class head: (model, .pth with head, .safetensors without)."""
    tmp = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    full, bare = str(tmp / "vit_tiny.pth"), str(tmp / "model.safetensors")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, full)
    safetensors.torch.save_file({k: v for k, v in net.state_dict().items() if not k.startswith("head.")}, bare)
    return net, full, bare


def test_timm_teacher_from_a_local_file_gives_timms_pooled_pre_logits(timm_vit, caplog):
    net, full, bare = timm_vit
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features((x - 0.5) / 0.5), pre_logits=True)
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(full, arch="timm/vit_tiny_patch16_224")
    assert "dropped 2 non-backbone key(s): head.* (2 keys)" in caplog.text
    assert (teacher.fmt, teacher.feat_dim, teacher.input_norm) == ("timm", 192, "mean/std (0.5, 0.5, 0.5)")
    assert (
        rel(teacher(x), expected) < 1e-5
        and rel(load_teacher(bare, arch="timm/vit_tiny_patch16_224")(x), expected) < 1e-5
    )
    logits = load_teacher(full, arch="timm/vit_tiny_patch16_224", use_fc=True)(x)
    assert rel(logits, net((x - 0.5) / 0.5).detach()) < 1e-5


def test_timm_arch_on_a_publisher_file_says_which_it_is(tmp_path):
    path = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(dinov2_file(), path)
    with pytest.raises(
        CheckpointError, match=r"missing 140 key\(s\).*the file is a 'dinov2' checkpoint: leave --arch_teacher unset"
    ):
        load_teacher(path, arch="timm/vit_small_patch14_dinov2")


def test_timm_arch_over_a_dino_vit_layout_says_which_preprocessing_each_reading_uses(tmp_path, caplog):
    """A DINO ViT's keys are timm's names, so --arch_teacher timm/<name> decides; one line says the layout it
    overrides and the input each reading would use (DINO: ImageNet mean/std; this timm ViT: 0.5)."""
    path = str(tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save(vit_weights(width=192, depth=12, patch=16, grid=14), path)
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(path, arch="timm/vit_tiny_patch16_224")
    notes = [r.getMessage() for r in caplog.records if "key layout" in r.getMessage()]
    assert notes == [
        f"teacher '{path}' has the key layout of a dino_vit file (read as one: input ImageNet mean/std); "
        "--arch_teacher timm/vit_tiny_patch16_224 reads it as timm's network with timm's preprocessing (input mean "
        "(0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)) - leave --arch_teacher unset to read it as dino_vit"
    ]
    assert "read as DINO's" not in caplog.text  # the layout's own reading was only probed, not taken
    assert (teacher.fmt, teacher.input_norm) == ("timm", "mean/std (0.5, 0.5, 0.5)")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load_teacher(path).input_norm == "imagenet"  # left unset: DINO's reading, no note
    assert "key layout" not in caplog.text


# ---------------------------------------------------------------- the pipeline
@pytest.fixture
def vit_teacher_file(tmp_path) -> str:
    """A DINO ViT-S/8 backbone release with 1 block, stored grid 4x4 (32 px)."""
    path = str(tmp_path / "dino_deitsmall8_pretrain.pth")
    torch.save(vit_weights(depth=1, patch=8), path)
    return path


def _train_args(data, teacher, exp, *extra):
    argv = [data, "--teacher_weights", teacher, "--image_size", "32", "--batch_size", "8", "--epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--single_aug", "--weak_weak", "--exp_dir", exp,
            "--print_freq", "1", *extra]  # fmt: skip
    return train_student.get_args_parser().parse_args(argv)


def test_a_vit_teacher_distils_end_to_end_and_is_evaluated(tiny_data, vit_teacher_file, tmp_path):
    exp = str(tmp_path / "exp")
    stats = train_student.main(_train_args(tiny_data, vit_teacher_file, exp, "--arch_student", "resnet18",
                                           "--teacher_pool", "cls+avg"))  # fmt: skip
    assert 0.0 < stats["loss"] < 4.0
    ckpt = torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    assert ckpt["head"]["7.weight"].shape == (768, 1024)  # regresses the 768-d cls+avg feature
    assert "/dino_vit/fc=False/pool=cls+avg/" in ckpt["identity"]["teacher"]
    results = eval_knn.main(eval_knn.get_args_parser().parse_args(
        [tiny_data, "--teacher", "--weights", vit_teacher_file, "--resize_size", "32", "--crop_size", "32", "-j", "0",
         "-b", "8", "-k", "1", "--save", str(tmp_path / "knn_teacher")]))  # fmt: skip
    # the 1-NN accuracy is what a brute-force search over the saved features gives
    saved = tmp_path / "knn_teacher"
    feats = {s: torch.from_numpy(np.load(saved / f"{s}_feats.npy")).float() for s in ("train", "val")}
    labels = {s: np.load(saved / f"{s}_labels.npy") for s in ("train", "val")}
    sims = torch.nn.functional.normalize(feats["val"], dim=1) @ torch.nn.functional.normalize(feats["train"], dim=1).T
    nearest = labels["train"][sims.argmax(dim=1).numpy()]
    assert results["k"][1]["majority"]["top1"] == pytest.approx(100.0 * (nearest == labels["val"]).mean())
    record = json.load(open(saved / "knn_results.json"))
    assert record["model"]["format"] == "dino_vit" and record["model"]["arch"] == "vit_s8_depth1"


def test_a_timm_student_trains_one_epoch_and_exports_into_timm(tiny_data, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "exp")
    train_student.main(
        _train_args(tiny_data, resnet18_teacher_file, exp, "--arch_student", "timm/mobilenetv3_small_050")
    )
    export = os.path.join(exp, "checkpoints", "student_backbone.pth")
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(export, weights_only=True), strict=True)
    # the export and the checkpoint evaluate as the same timm network
    a = load_eval_model(export, arch="timm/mobilenetv3_small_050")
    b = load_eval_model(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"))
    x = torch.rand(2, 3, 32, 32)
    assert b.arch == "timm/mobilenetv3_small_050" and torch.equal(a(x), b(x))
    # --weights from a timm file with its classifier (a pretrained timm student)
    clf = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=7).state_dict()
    pretrained = str(tmp_path / "pretrained.pth")
    torch.save(clf, pretrained)
    extra = ("--arch_student", "timm/mobilenetv3_small_050", "--weights", pretrained)
    train_student.main(_train_args(tiny_data, resnet18_teacher_file, str(tmp_path / "exp2"), *extra))


def test_torchvision_student_exports_evaluate_without_losing_backbone_layers(tmp_path):
    """mobilenet_v3's classifier.0 is part of the backbone: only classifier.3 is the classifier."""
    student = Student("mobilenet_v3_large", teacher_dim=16).eval()
    path = str(tmp_path / "student_backbone.pth")
    torch.save(student.backbone_state_dict(), path)
    model = load_eval_model(path, arch="mobilenet_v3_large")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), student.encoder(x))


def _cache_args(data, teacher, out, crop, *extra):
    argv = [data, "--teacher_weights", teacher, "--resize_size", "32", "--crop_size", str(crop), "--batch_size", "4",
            "--num_workers", "0", "--device", "cpu", "--out", out, *extra]  # fmt: skip
    return cache_teacher_features.get_args_parser().parse_args(argv)


def test_cache_of_a_vit_teacher_records_its_pooling(tiny_data, tmp_path):
    path = str(tmp_path / "dinov2.pth")
    torch.save(dinov2_file(), path)
    out = str(tmp_path / "cache.npy")
    cache_teacher_features.main(_cache_args(tiny_data, path, out, 28, "--teacher_pool", "avg"))
    manifest = json.load(open(tmp_path / "cache.json"))
    assert manifest["teacher"]["pool"] == "avg" and manifest["shape"] == [16, 384]
    bad = _train_args(
        tiny_data, path, str(tmp_path / "e"), "--use_cache", "--teacher_feats", out, "--teacher_pool", "cls"
    )
    with pytest.raises(UserError, match="holds avg features, not --teacher_pool cls"):
        train_student.main(bad)
    with pytest.raises(UserError, match="of 30x30 px is not a multiple of the ViT teacher's patch size 14"):
        cache_teacher_features.main(_cache_args(tiny_data, path, str(tmp_path / "c2.npy"), 30))


@pytest.mark.slow
def test_compiled_vit_teacher_is_not_folded_and_equal(tmp_path):
    path = str(tmp_path / "dinov2.pth")
    raw = dinov2_file()
    torch.save(raw, path)
    teacher = load_teacher(path)
    x = torch.rand(2, 3, 56, 56)
    expected = teacher(x)
    assert count_batchnorms(teacher.encoder) == 0
    teacher.encoder = compile_frozen(teacher.encoder, backend="eager")
    assert rel(teacher(x), expected) < 1e-5 and rel(expected, reference_vit(raw, x, heads=6)) < 1e-4


def test_safetensors_student_weights_and_evaluation(tmp_path):
    """--weights and evaluation --weights read .safetensors too; a timm file's classifier is dropped."""
    torch.manual_seed(0)
    source = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5).eval()
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(source.state_dict(), path)
    student = Student("timm/mobilenetv3_small_050", teacher_dim=8)
    fmt, conv = read_student_weights(path, student.encoder.backbone, student.arch)
    student.encoder.backbone.load_state_dict(conv.backbone, strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(student.encoder.normalize(x)), pre_logits=True)
    assert fmt == "timm" and rel(load_eval_model(path, arch="timm/mobilenetv3_small_050")(x), expected) < 1e-5
