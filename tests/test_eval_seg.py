"""eval_seg.py: the two public layouts (Pascal VOC 2012, ADE20K) on tiny sets, mIoU against a brute-force
computation, the probe against the 1x1 classifier on the upsampled map, the stored maps reused only while
current, the demo set deterministic, and every mistake one sentence through the command."""

from __future__ import annotations

import filecmp
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import eval_seg
from data.demo import make_seg_dataset, voc_palette
from data.segmentation import IGNORE, SegmentationSet, detect_layout, read_label
from tools.engine.cli import run_cli
from tools.eval.seg_probe import SegProbe, confusion_matrix, scores

pytestmark = pytest.mark.usefixtures("one_thread")


# ============ scores ============
def brute_force_miou(pred: np.ndarray, label: np.ndarray, n: int) -> tuple[float, float, list]:
    """mIoU (%) over classes present in labels or predictions, pixel accuracy (%), per-class IoU, by loops."""
    ious = []
    for c in range(n):
        inter = union = 0
        for p, t in zip(pred.ravel(), label.ravel(), strict=True):
            if t == IGNORE:
                continue
            inter += p == c and t == c
            union += p == c or t == c
        ious.append(100.0 * inter / union if union else None)
    kept = [v for v in ious if v is not None]
    valid = label != IGNORE
    return sum(kept) / len(kept), 100.0 * float((pred[valid] == label[valid]).mean()), ious


def test_miou_and_pixel_accuracy_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(3, 9, 7)).astype(np.uint8)  # class 4 never appears in the labels
    label[rng.random(label.shape) < 0.2] = IGNORE
    pred = rng.integers(0, 4, size=label.shape)
    pred[0, 0, :3] = 5 - 1  # class 4 predicted a few times: a false positive with IoU 0
    label[0, 0, :3] = 1
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 6)  # class 5 nowhere: left out
    got = scores(conf, tuple("abcdef"))
    miou, acc, ious = brute_force_miou(pred, label, 6)
    assert got["miou"] == pytest.approx(miou) and got["pixel_acc"] == pytest.approx(acc)
    assert list(got["per_class_iou"].values())[:5] == pytest.approx(ious[:5])
    assert got["per_class_iou"]["f"] is None and got["per_class_iou"]["e"] == 0.0 and got["classes_scored"] == 5
    assert int(conf.sum()) == int((label != IGNORE).sum())


def test_the_probe_is_a_1x1_classifier_on_the_bilinearly_upsampled_map():
    torch.manual_seed(0)
    probe = SegProbe(8, 5).eval()
    probe.bn.running_mean.uniform_(-1, 1), probe.bn.running_var.uniform_(0.5, 2)
    maps = torch.randn(2, 8, 3, 4)
    up = F.interpolate(maps, size=(17, 23), mode="bilinear", align_corners=False)
    want = F.conv2d(probe.bn(up), probe.conv.weight, probe.conv.bias)
    torch.testing.assert_close(probe(maps, (17, 23)), want, rtol=1e-5, atol=1e-5)


# ============ tiny sets in both layouts ============
def write_voc(root, n_train: int = 6, n_val: int = 3, size=(40, 48), n_classes: int = 21) -> str:
    """JPEGImages/ + palette SegmentationClass/ + ImageSets/Segmentation/{train,val}.txt; squares of a class."""
    rng = np.random.default_rng(1)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"2007_{split}{k:03d}" for k in range(n)]
        for k, name in enumerate(ids):
            label = np.zeros(size, np.uint8)
            c = 1 + k % (n_classes - 1)
            label[8:24, 10:30] = c
            label[7, 10:30] = IGNORE  # a VOC-style border
            image = rng.integers(0, 60, size=(*size, 3)).astype(np.uint8)
            image[label == c] = (40 * c) % 256
            Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=95)
            png = Image.fromarray(label, "P")
            png.putpalette(voc_palette())
            png.save(os.path.join(root, "SegmentationClass", f"{name}.png"))
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return str(root)


def write_ade(root, n_train: int = 4, n_val: int = 2) -> str:
    """images/{training,validation}/*.jpg and annotations/*/*.png with 0 = other, 1..150 the classes."""
    rng = np.random.default_rng(2)
    for split, sub, n in (("train", "training", n_train), ("val", "validation", n_val)):
        os.makedirs(os.path.join(root, "images", sub), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", sub), exist_ok=True)
        for k in range(n):
            label = np.zeros((36, 44), np.uint8)
            label[4:20, 6:30] = 1 + k
            label[20:, :] = 150
            image = rng.integers(0, 255, size=(36, 44, 3)).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(root, "images", sub, f"ADE_{split}_{k:08d}.jpg"))
            Image.fromarray(label, "L").save(os.path.join(root, "annotations", sub, f"ADE_{split}_{k:08d}.png"))
    return str(root)


def test_the_two_layouts_are_read_as_published(tmp_path):
    voc = detect_layout(write_voc(tmp_path / "VOC2012"))
    assert voc.name == "voc" and len(voc.classes) == 21 and voc.classes[15] == "person"
    pairs = SegmentationSet(voc, "val", 32)
    image, label, index = pairs[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label.shape == (32, 32) and index == 1
    assert pairs.original_label(1).shape == (40, 48) and set(np.unique(pairs.original_label(1))) == {0, 2, IGNORE}
    ade = detect_layout(write_ade(tmp_path / "ADEChallengeData2016"))
    assert ade.name == "ade20k" and len(ade.classes) == 150 and ade.classes[0] == "class_1"
    raw = np.array(Image.open(os.path.join(ade.root, "annotations", "training", "ADE_train_00000001.png")))
    shifted = read_label(os.path.join(ade.root, "annotations", "training", "ADE_train_00000001.png"), ade)
    assert raw[0, 0] == 0 and shifted[0, 0] == IGNORE  # "other" is ignored
    assert raw[5, 7] == 2 and shifted[5, 7] == 1 and raw[30, 0] == 150 and shifted[30, 0] == 149


def run_seg(data: str, save: str, *extra: str) -> dict:
    argv = [data, "--arch", "resnet18", "--random_init", "--save", save, "--image_size", "64", "--workers", "0",
            "--epochs", "2", "--batch_size", "4", "--extract_batch", "4", "--device", "cpu", *extra]  # fmt: skip
    return eval_seg.main(eval_seg.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("layout", ["voc", "ade20k"])
def test_eval_seg_reports_the_miou_of_its_probe_computed_by_brute_force(tmp_path, layout, caplog):
    data = write_voc(tmp_path / "voc") if layout == "voc" else write_ade(tmp_path / "ade")
    save = str(tmp_path / "out")
    result = run_seg(data, save)
    saved = json.load(open(os.path.join(save, "seg_results.json")))
    assert saved["miou"] == pytest.approx(result["miou"]) and saved["protocol"]["layout"] == layout
    assert saved["feature_map"] == [512, 2, 2] and len(saved["train_losses"]) == 2
    # the numbers again, from the stored val maps, the saved probe and the label files, pixel by pixel
    layout_ = detect_layout(data)
    probe = SegProbe(512, len(layout_.classes))
    probe.load_state_dict(torch.load(os.path.join(save, "probe.pth"), weights_only=True))
    maps = np.load(os.path.join(save, "features", "val_maps.npy"))
    val = SegmentationSet(layout_, "val", 64)
    preds, labels = [], []
    for i in range(len(val)):
        label = val.original_label(i)
        with torch.no_grad():
            preds.append(probe.eval()(torch.from_numpy(maps[i : i + 1]).float(), label.shape).argmax(1)[0].numpy())
        labels.append(label)
    miou, acc, _ = brute_force_miou(np.concatenate([p.ravel() for p in preds]),
                                    np.concatenate([t.ravel() for t in labels]), len(layout_.classes))  # fmt: skip
    assert result["miou"] == pytest.approx(miou) and result["pixel_acc"] == pytest.approx(acc)
    # a second run reuses the stored maps and trains the same probe
    with caplog.at_level(logging.INFO):
        again = run_seg(data, save)
    assert "reusing the train feature maps" in caplog.text and again["miou"] == pytest.approx(result["miou"])


def test_stale_maps_are_recomputed(tmp_path, caplog):
    data, save = write_voc(tmp_path / "voc"), str(tmp_path / "out")
    run_seg(data, save)
    with caplog.at_level(logging.INFO):
        run_seg(data, save, "--seed", "1")  # another random init: other maps
    assert "stored train maps" in caplog.text and "are stale" in caplog.text


def test_a_distilled_student_and_a_teacher_are_evaluated(tmp_path):
    data = write_voc(tmp_path / "voc")
    teacher = str(tmp_path / "r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), teacher)
    result = eval_seg.main(eval_seg.get_args_parser().parse_args(
        [data, "--weights", teacher, "--teacher", "--save", str(tmp_path / "t"), "--image_size", "64", "--workers",
         "0", "--epochs", "1", "--device", "cpu", "--no_bn"]))  # fmt: skip
    assert result["model"]["kind"] == "teacher" and result["protocol"]["probe"].startswith("1x1 convolution")


# ============ the demo set ============
def test_the_segmentation_demo_is_deterministic_and_in_voc_layout(tmp_path):
    a = make_seg_dataset(str(tmp_path / "a"), n_train=6, n_val=3)
    b = make_seg_dataset(str(tmp_path / "b"), n_train=6, n_val=3)
    layout = detect_layout(a)
    assert layout.name == "voc" and layout.classes[0] == "background" and len(layout.classes) == 11
    names = sorted(os.listdir(os.path.join(a, "SegmentationClass")))
    assert len(names) == 9
    for sub in ("JPEGImages", "SegmentationClass"):
        for name in os.listdir(os.path.join(a, sub)):
            assert filecmp.cmp(os.path.join(a, sub, name), os.path.join(b, sub, name), shallow=False)
    label = Image.open(os.path.join(a, "SegmentationClass", names[0]))
    values = set(np.unique(np.array(label)))
    assert label.mode == "P" and values <= {0, IGNORE, *range(1, 11)} and len(values - {0, IGNORE}) >= 1
    image_folder = [
        f for d in sorted(os.listdir(os.path.join(a, "train"))) for f in os.listdir(os.path.join(a, "train", d))
    ]
    assert len(image_folder) == 6  # the same images, by their large digit's class


# ============ mistakes: one sentence through the command ============
def _seg_cases(tmp_path) -> dict:
    voc = write_voc(tmp_path / "VOCdevkit" / "VOC2012")
    rgb = write_voc(tmp_path / "rgb")
    Image.open(os.path.join(rgb, "SegmentationClass", "2007_val000.png")).convert("RGB").save(
        os.path.join(rgb, "SegmentationClass", "2007_val000.png"))  # fmt: skip
    big = write_voc(tmp_path / "big")
    Image.fromarray(np.full((40, 48), 40, np.uint8), "L").save(
        os.path.join(big, "SegmentationClass", "2007_train001.png")
    )
    no_sets = write_voc(tmp_path / "nosets")
    os.remove(os.path.join(no_sets, "ImageSets", "Segmentation", "val.txt"))
    no_label = write_voc(tmp_path / "nolabel")
    os.remove(os.path.join(no_label, "SegmentationClass", "2007_train002.png"))
    base = ["--arch", "resnet18", "--random_init", "--save", str(tmp_path / "o"), "--image_size", "64", "--workers",
            "0", "--epochs", "1", "--device", "cpu"]  # fmt: skip
    return {
        "no folder": ([str(tmp_path / "nope"), *base], "segmentation data folder '.*nope' does not exist"),
        "not a layout": ([str(tmp_path), *base], "is neither a Pascal VOC 2012 folder"),
        "VOCdevkit given": ([str(tmp_path / "VOCdevkit"), *base], "holds VOC2012/; give '.*VOC2012' as DATA"),
        "RGB label": ([rgb, *base], "label '.*2007_val000.png' is a RGB image; labels are class indices"),
        "class out of range": ([big, *base], "holds class value 40, but the voc layout has 21 classes"),
        "no val list": ([no_sets, *base], "ImageSets/Segmentation/val.txt' does not exist"),
        "label missing": ([no_label, *base], "2007_train002.png' does not exist; every train image needs its label"),
        "weights missing": ([voc, "--weights", "w.pth", "--save", str(tmp_path / "o")], "--weights 'w.pth' does not"),
        "random init teacher": ([voc, *base, "--teacher"], "--random_init evaluates an untrained student --arch"),
        "nothing to evaluate": ([voc, "--save", str(tmp_path / "o")], "nothing to evaluate"),
        "no output folder": ([voc, "--arch", "resnet18", "--random_init"], "no output folder: give --save DIR"),
        "ViT patch": ([voc, "--arch", "timm/vit_tiny_patch16_224", "--random_init", "--save", str(tmp_path / "o"),
                       "--image_size", "60", "--device", "cpu"], "--image_size of 60x60 px is not a multiple of .* 16"),
    }  # fmt: skip


def test_mistakes_are_one_sentence(tmp_path, caplog):
    import re

    for name, (argv, message) in _seg_cases(tmp_path).items():
        caplog.clear()
        args = eval_seg.get_args_parser().parse_args(argv)
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
            run_cli(eval_seg.main, args)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert exit_info.value.code == 2 and len(errors) == 1, (name, errors)
        assert "\n" not in errors[0] and re.search(message, errors[0]), (name, errors[0])


def test_a_hugging_face_snapshot_folder_is_probed(tmp_path):
    from tests.hf_reference import build, write_snapshot

    folder = write_snapshot(build("dinov2_registers"), str(tmp_path / "dinov2_reg"))
    data = write_voc(tmp_path / "voc")
    result = eval_seg.main(eval_seg.get_args_parser().parse_args(
        [data, "--weights", folder, "--save", str(tmp_path / "hf"), "--image_size", "56", "--workers", "0",
         "--epochs", "1", "--device", "cpu"]))  # fmt: skip
    assert result["feature_map"][1:] == [4, 4] and result["model"]["kind"] == "teacher"
