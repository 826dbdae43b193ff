"""--loss dense / both through train_student.py: exact resume, the run identity, checkpoints, export and hub,
teacher caches with dense targets (centre crops, K views, --cache_grid), several teachers, bf16, and the
user's mistakes as one sentence."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import torchvision

import hubconf
import train_student
from data.datasets import IndexedImageFolder
from data.transforms import CenterCrop, TeacherView, TrainViews
from models.fold import compile_frozen
from models.simreg import resample_grid
from models.teachers import load_teacher
from tests.conftest import write_image_folder, write_random_resnet18
from tests.vit_reference import dinov2_file
from tools import cache_teacher_features, export
from tools.engine.cli import run_cli
from tools.engine.run_state import teacher_fingerprint
from tools.teacher_cache.reader import open_cached_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64  # a ResNet's 2 x 2 map


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dense_data")
    write_image_folder(str(root / "train"), per_class=8, size=SIZE, seed=0)
    write_image_folder(str(root / "val"), per_class=2, size=SIZE, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return write_random_resnet18(tmp_path_factory.mktemp("dense_teacher") / "r18.pth")


def argv_for(data: str, teacher: str, exp: str, epochs: int, *extra: str, size: int = SIZE) -> list[str]:
    return [data, "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", str(size),
            "--batch_size", "8", "--epochs", str(epochs), "--num_workers", "0", "--device", "cpu", "--single_aug",
            "--weak_weak", "--exp_dir", exp, "--print_freq", "1", "--save_freq", "1", *extra]  # fmt: skip


def train(*argv: str) -> dict:
    return train_student.main(train_student.get_args_parser().parse_args(list(argv)))


def latest(exp: str) -> dict:
    return torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)


def assert_same_state(a: dict, b: dict, parts=("student", "head")) -> None:
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


# ============ exact resume, the run identity, the checkpoint ============
@pytest.mark.parametrize("loss", ["dense", pytest.param("both", marks=pytest.mark.slow)])
def test_resume_after_one_epoch_equals_two_epochs_bit_for_bit(data, teacher, tmp_path, loss):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    extra = ("--loss", loss) + (("--dense_weight", "0.5") if loss == "both" else ())
    train(*argv_for(data, teacher, straight, 2, *extra))
    train(*argv_for(data, teacher, split, 1, *extra))
    stats = train(*argv_for(data, teacher, split, 2, *extra))  # resumes from the latest checkpoint
    a, b = latest(straight), latest(split)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a, b)
    assert len(a["dense_heads"]) == len(b["dense_heads"]) == 1
    for k in a["dense_heads"][0]:
        assert torch.equal(a["dense_heads"][0][k], b["dense_heads"][0][k]), f"dense head {k} differs"
    if loss == "both":
        assert stats["loss"] == pytest.approx(stats["loss_global"] + 0.5 * stats["loss_dense"], rel=1e-6)
    else:
        assert a["head"] == {} and "loss_dense" not in stats
    assert 0 < stats["loss"] < 4


def test_checkpoint_export_and_hub_drop_the_dense_head(data, teacher, tmp_path, caplog):
    exp = str(tmp_path / "exp")
    train(*argv_for(data, teacher, exp, 1, "--loss", "dense", "--n_mlp_layers", "4"))
    ckpt = latest(exp)
    assert ckpt["head"] == {} and ckpt["identity"]["loss"] == "dense" and ckpt["identity"]["dense_blocks"] == 1
    dense = ckpt["dense_heads"][0]
    assert {k for k in dense if k.endswith("weight")} == {f"{i}.weight" for i in (0, 1, 3, 4, 5, 7)}
    assert dense["0.weight"].shape == (1024, 512, 1, 1) and dense["7.weight"].shape == (512, 1024, 1, 1)
    exported = torch.load(os.path.join(exp, "checkpoints", "student_backbone.pth"), weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(exported, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    path = os.path.join(exp, "checkpoints", "checkpoint_latest.pth")
    model = hubconf.student(weights=path)
    x = torch.rand(2, 3, SIZE, SIZE)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(exported)
    torch.testing.assert_close(model(x), net.eval()((x - model.encoder.normalize.mean) / model.encoder.normalize.std))
    args = export.get_args_parser().parse_args([path, "--format", "torchvision", "--out", str(tmp_path / "e.pth")])
    export.main(args)
    args = export.get_args_parser().parse_args([path, "--format", "onnx", "--with_head", "--out", str(tmp_path / "h")])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        run_cli(export.main, args)
    assert "was trained with --loss dense: it has no global prediction head" in caplog.text


def test_a_run_cannot_resume_with_another_loss(data, teacher, tmp_path):
    exp = str(tmp_path / "e")
    train(*argv_for(data, teacher, exp, 1))
    with pytest.raises(train_student.UserError, match="different run.*loss"):
        train(*argv_for(data, teacher, exp, 2, "--loss", "dense"))
    exp = str(tmp_path / "d")
    train(*argv_for(data, teacher, exp, 1, "--loss", "both"))
    with pytest.raises(train_student.UserError, match="different run.*dense_weight"):
        train(*argv_for(data, teacher, exp, 2, "--loss", "both", "--dense_weight", "2"))


# ============ teacher caches with dense targets ============
def build_cache(data: str, teacher: str, out, *extra: str, dense: bool = True) -> str:
    argv = [data, "--teacher_weights", teacher, "--out", str(out), "--batch_size", "5", "--num_workers", "0",
            "--device", "cpu", "--resize_size", str(SIZE), "--crop_size", str(SIZE), *extra]  # fmt: skip
    argv += ["--dense"] if dense else []
    cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))
    return str(out)


def test_centre_crop_cache_holds_the_live_dense_targets(data, teacher, tmp_path):
    path = build_cache(data, teacher, tmp_path / "c.npy")
    manifest = json.load(open(tmp_path / "c.json"))
    assert manifest["dense"]["grid"] == [2, 2] and manifest["dense"]["bytes_per_row"] == 2 * 2 * 512 * 2
    cached = open_cached_teacher(path, None, torch.device("cpu")).use_objective("both")
    live = load_teacher(teacher).use_objective("both", image_size=SIZE)
    crops = IndexedImageFolder(os.path.join(data, "train"), CenterCrop(SIZE, SIZE))
    x = torch.stack([crops[i][0] for i in range(len(crops))]).float() / 255
    index = torch.arange(len(crops)).flip(0)
    with torch.inference_mode():
        want = live.targets(x[index], index)
    got = cached.targets(x, index)
    for part in ("global", "dense"):
        torch.testing.assert_close(got[part], want[part], rtol=2e-3, atol=2e-3)  # float16 rows
    on_device = open_cached_teacher(path, None, torch.device("cpu"), on_device=True).use_objective("both")
    assert on_device.dense_table is not None
    for part in ("global", "dense"):
        assert torch.equal(on_device.targets(x, index)[part], got[part])
    coarse = build_cache(data, teacher, tmp_path / "g.npy", "--cache_grid", "1")
    pooled = open_cached_teacher(coarse, None, torch.device("cpu")).use_objective("dense")
    got = pooled.targets(x, index)
    torch.testing.assert_close(got["dense"], resample_grid(want["dense"], (1, 1)), rtol=2e-3, atol=2e-3)
    # targets on another grid are other targets: the run identity says so
    assert teacher_fingerprint(pooled, None, False).endswith("/dense 1x1")
    assert teacher_fingerprint(cached, None, False).endswith("/dense 2x2")


def test_k_view_cache_dense_rows_are_the_training_crops_and_train(data, teacher, tmp_path):
    views = ["--views", "2", "--single_aug", "--weak_weak", "--image_size", str(SIZE), "--seed", "0"]
    path = build_cache(data, teacher, tmp_path / "k.npy", *views)
    cached = open_cached_teacher(path, None, torch.device("cpu")).use_objective("dense")
    live = load_teacher(teacher).use_objective("dense", image_size=SIZE)

    for epoch in (1, 2):
        cached.set_epoch(epoch)
        x = training_crops(data, epoch).float() / 255
        index = torch.arange(len(x))
        with torch.inference_mode():
            want = live.targets(x, index)["dense"]
        torch.testing.assert_close(cached.targets(x, index)["dense"], want, rtol=2e-3, atol=2e-3)
    stats = train(*argv_for(data, teacher, str(tmp_path / "exp"), 2, "--loss", "dense", "--use_cache",
                            "--teacher_feats", path))  # fmt: skip
    assert 0 < stats["loss"] < 4


def test_a_cache_without_the_run_s_dense_targets_is_one_sentence(data, teacher, tmp_path, caplog):
    plain = build_cache(data, teacher, tmp_path / "p.npy", dense=False)
    dense = build_cache(data, teacher, tmp_path / "d.npy")
    for cache, extra, message in (
        (plain, (), "holds pooled features only; --loss dense needs its dense targets: rebuild it with"),
        (dense, ("--dense_blocks", "2"), "holds the tokens of the last 1 block(s), but --dense_blocks is 2"),
    ):
        caplog.clear()
        argv = argv_for(data, teacher, str(tmp_path / "e"), 1, "--loss", "dense", "--use_cache", "--teacher_feats",
                        cache, *extra)  # fmt: skip
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
            run_cli(train_student.main, train_student.get_args_parser().parse_args(argv))
        assert message in caplog.text


def training_crops(data: str, epoch: int, seed: int = 0) -> torch.Tensor:
    """The crops the training loader gives every image in ``epoch`` (single weak view), (N, 3, S, S)."""
    views = TrainViews(SIZE, True, True, False, "auto", min_scale=0.2, flip=True)
    dataset = IndexedImageFolder(os.path.join(data, "train"), TeacherView(views), seed=seed)
    return torch.stack([dataset[(i, epoch)][0] for i in range(len(dataset))])


# ============ several teachers, a ViT among them; bf16; a compiled teacher ============
@pytest.mark.slow
def test_a_vit_and_a_resnet_teacher_each_get_a_dense_head(data, teacher, tmp_path):
    vit = str(tmp_path / "dinov2.pth")
    torch.save(dinov2_file(), vit)
    exp = str(tmp_path / "two")
    argv = argv_for(data, teacher, exp, 1, "--loss", "both", "--dense_blocks", "2", size=56)
    argv[argv.index("--teacher_weights") + 1 : argv.index("--teacher_weights") + 2] = [vit, teacher]
    with pytest.raises(train_student.UserError, match="--dense_blocks 2 concatenates a ViT's last blocks"):
        train(*argv)
    argv[argv.index("--dense_blocks") + 1] = "1"
    stats = train(*argv)
    ckpt = latest(exp)
    assert [h["7.weight"].shape[0] for h in ckpt["dense_heads"]] == [384, 512]
    assert [h["7.weight"].shape[0] for h in ckpt["heads"]] == [384, 512]
    assert {"loss_teacher_1", "loss_teacher_2", "loss_global", "loss_dense"} <= set(stats)


def test_bf16_autocast_runs_the_dense_objective(data, teacher, tmp_path):
    stats = train(*argv_for(data, teacher, str(tmp_path / "bf16"), 1, "--loss", "both", "--amp", "bf16"))
    assert np.isfinite(stats["loss"]) and 0 < stats["loss_dense"] < 4


def test_a_compiled_teacher_keeps_its_feature_map_tap(teacher):
    plain = load_teacher(teacher).use_objective("both", image_size=SIZE)
    fast = load_teacher(teacher).use_objective("both", image_size=SIZE)
    fast.encoder = compile_frozen(fast.encoder, backend="eager", fold=False)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        a, b = plain.targets(x, None), fast.targets(x, None)
    torch.testing.assert_close(b["dense"], a["dense"])
    torch.testing.assert_close(b["global"], a["global"])


def test_a_hugging_face_snapshot_teaches_densely_live_and_from_a_cache(data, tmp_path):
    """A DINOv2-with-registers snapshot folder: its patch tokens (56 px: 4 x 4) cached with --dense, and trained
    on live and from that cache (a ResNet-18's 2 x 2 map, the targets resampled to it)."""
    from tests.hf_reference import build, write_snapshot

    folder = write_snapshot(build("dinov2_registers"), str(tmp_path / "dinov2_reg"))
    argv = [data, "--teacher_weights", folder, "--out", str(tmp_path / "hf.npy"), "--batch_size", "8",
            "--num_workers", "0", "--device", "cpu", "--resize_size", "56", "--crop_size", "56", "--dense"]  # fmt: skip
    cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))
    dense = json.load(open(tmp_path / "hf.json"))["dense"]
    assert dense["grid"] == [4, 4] and dense["source"] == "vit"
    live = train(*argv_for(data, folder, str(tmp_path / "live"), 1, "--loss", "dense", size=56))
    cached = train(*argv_for(data, folder, str(tmp_path / "cached"), 1, "--loss", "both", "--use_cache",
                             "--teacher_feats", str(tmp_path / "hf.npy"), size=56))  # fmt: skip
    assert 0 < live["loss"] < 4 and 0 < cached["loss_dense"] < 4
    assert latest(str(tmp_path / "live"))["dense_heads"][0]["7.weight"].shape[0] == dense["channels"]
