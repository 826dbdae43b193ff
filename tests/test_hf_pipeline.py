"""A Hugging Face snapshot folder works wherever a teacher file works: live training, the centre-crop and
K-view caches, several teachers, eval_knn.py --teacher, tools.export --teacher, the torch.hub teacher;
and each user mistake with one gets one sentence through the command (exit status 2)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

import eval_knn
import train_student
from models.errors import UserError
from models.io import file_sha256
from models.teachers import load_teacher
from tests.conftest import ROOT
from tests.hf_reference import build, reference, rel, write_snapshot
from tools import cache_teacher_features, export
from tools.engine.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def snaps(tmp_path_factory) -> dict:
    """Patch-16 snapshots (the 32 px crops of the tiny data): DINOv3 with registers, SigLIP, CLIP."""
    root = tmp_path_factory.mktemp("snaps")
    return {case: write_snapshot(build(case), str(root / case)) for case in ("dinov3", "siglip", "clip")}


def train_args(data, exp, *extra):
    argv = [
        data,
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--single_aug",
        "--weak_weak",
        "--exp_dir",
        str(exp),
        "--print_freq",
        "100",
        "--n_mlp_layers",
        "2",
        *extra,
    ]
    return train_student.get_args_parser().parse_args(argv)


def cache_args(data, folder, out, *extra):
    argv = [
        data,
        "--teacher_weights",
        folder,
        "--out",
        str(out),
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
    return cache_teacher_features.get_args_parser().parse_args(argv)


def test_live_training_then_knn_of_the_teacher(tiny_data, snaps, tmp_path):
    exp = tmp_path / "exp"
    stats = train_student.main(train_args(tiny_data, exp, "--teacher_weights", snaps["dinov3"]))
    assert 0.0 < stats["loss"] < 4.0
    ckpt = torch.load(exp / "checkpoints" / "checkpoint_latest.pth", weights_only=True)
    assert ckpt["head"]["3.weight"].shape[0] == 32  # regresses the 32-d pooled output
    assert ckpt["identity"]["teacher"].startswith("hf_dinov3_vit_w32_p16_depth2/huggingface/fc=False")
    assert ckpt["identity"]["teacher"].endswith(file_sha256(snaps["dinov3"]))
    for extra in (["--teacher"], []):  # a folder is a teacher with or without --teacher
        save = tmp_path / f"knn{len(extra)}"
        argv = [
            tiny_data,
            *extra,
            "--weights",
            snaps["dinov3"],
            "--resize_size",
            "32",
            "--crop_size",
            "32",
            "-j",
            "0",
            "-b",
            "8",
            "-k",
            "1",
            "--save",
            str(save),
        ]
        eval_knn.main(eval_knn.get_args_parser().parse_args(argv))
        saved = json.load(open(save / "knn_results.json"))
        assert saved["model"]["format"] == "huggingface" and saved["model"]["arch"] == "hf_dinov3_vit_w32_p16_depth2"


def test_several_teachers_a_snapshot_and_a_file(tiny_data, snaps, resnet18_teacher_file, tmp_path):
    exp = tmp_path / "exp"
    teachers = ["--teacher_weights", snaps["siglip"], resnet18_teacher_file, "--teacher_fc", "no"]
    stats = train_student.main(train_args(tiny_data, exp, *teachers))
    ckpt = torch.load(exp / "checkpoints" / "checkpoint_latest.pth", weights_only=True)
    assert [h["3.weight"].shape[0] for h in ckpt["heads"]] == [32, 512] and 0.0 < stats["loss"] < 4.0


def test_centre_crop_cache_is_the_live_teacher_and_is_tied_to_the_snapshot(tiny_data, snaps, tmp_path):
    folder = shutil.copytree(snaps["clip"], tmp_path / "clip")
    out = tmp_path / "clip.npy"
    cache_teacher_features.main(
        cache_args(tiny_data, str(folder), out, "--resize_size", "32", "--crop_size", "32", "--teacher_fc")
    )
    manifest = json.load(open(tmp_path / "clip.json"))
    assert manifest["teacher"]["weights_sha256"] == file_sha256(str(folder)) and manifest["shape"] == [16, 24]
    rows = np.load(out).astype(np.float32)
    teacher = load_teacher(str(folder), use_fc=True)
    from PIL import Image

    first = sorted(os.listdir(os.path.join(tiny_data, "train", "a")))[0]
    img = torch.from_numpy(np.array(Image.open(os.path.join(tiny_data, "train", "a", first)).convert("RGB")))
    live = teacher(img.permute(2, 0, 1)[None].float() / 255)
    assert rel(torch.from_numpy(rows[:1]), live) < 2e-3  # fp16 rows
    cached = ["--use_cache", "--teacher_feats", str(out), "--teacher_weights", str(folder), "--teacher_fc"]
    assert train_student.main(train_args(tiny_data, tmp_path / "e1", *cached))["loss"] > 0
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))  # another teacher now
    with pytest.raises(UserError, match="built from other weights than --teacher_weights"):
        train_student.main(train_args(tiny_data, tmp_path / "e2", *cached))


def test_k_view_cache_of_a_snapshot_trains(tiny_data, snaps, tmp_path):
    out = tmp_path / "views.npy"
    flags = ("--single_aug", "--weak_weak", "--image_size", "32")
    cache_teacher_features.main(cache_args(tiny_data, snaps["siglip"], out, "--views", "2", *flags))
    manifest = json.load(open(tmp_path / "views.json"))
    assert manifest["shape"] == [2, 16, 32] and manifest["teacher"]["arch"] == "hf_siglip_vit_w32_p16_depth2"
    losses = train_student.main(
        train_args(tiny_data, tmp_path / "e", "--use_cache", "--teacher_feats", str(out), "--epochs", "2")
    )
    assert losses["epoch"] == 2


def test_export_and_hub_teacher(snaps, tmp_path):
    out = str(tmp_path / "dinov3.pt")
    argv = [snaps["dinov3"], "--teacher", "--format", "torchscript", "--out", out, "--image_size", "32"]
    record = export.main(export.get_args_parser().parse_args(argv))
    assert record["source"]["format"] == "huggingface" and record["check"]["max_rel"] < 1e-5
    x = torch.rand(2, 3, 32, 32)  # a traced network keeps the RoPE grid of the size it was traced at
    teacher = load_teacher(snaps["dinov3"])
    assert torch.allclose(torch.jit.load(out)(x), teacher(x), atol=1e-5)
    hub = torch.hub.load(ROOT, "teacher", source="local", weights=snaps["dinov3"])
    assert hub.arch == teacher.arch and torch.equal(hub(x), teacher(x))
    model = build("dinov3")  # the same seed: the snapshot's own model
    assert rel(hub(x), reference("dinov3", model, hub.encoder.normalize(x))) < 1e-4


# ---------------------------------------------------------------- mistakes, through the commands
def _mistakes(root, snaps) -> dict:
    """name -> (command, argv, the sentence's text): each breaks one thing of a valid command line."""
    empty, unknown, shards, tensor, bare = (root / n for n in ("empty", "bert", "shards", "tensor", "bare"))
    empty.mkdir()
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    shutil.copy(os.path.join(snaps["dinov3"], "model.safetensors"), unknown / "model.safetensors")
    write_snapshot(build("dinov3"), str(shards), max_shard_size="20KB")
    files = sorted(f for f in os.listdir(shards) if f.startswith("model-"))
    os.remove(shards / files[1])
    shutil.copytree(snaps["siglip"], tensor)
    sd = safetensors.torch.load_file(str(tensor / "model.safetensors"))
    del sd["vision_model.head.probe"]
    safetensors.torch.save_file(sd, str(tensor / "model.safetensors"))
    bare.mkdir()
    shutil.copy(os.path.join(snaps["clip"], "model.safetensors"), bare / "clip.safetensors")
    return {
        "folder without config.json": (
            "train",
            ["--teacher_weights", str(empty)],
            "is a folder without config.json; give a checkpoint file, or a Hugging Face",
        ),
        "unknown model_type": (
            "knn",
            ["--teacher", "--weights", str(unknown)],
            "config.json says model_type 'bert', which is not a supported teacher; supported:",
        ),
        "missing shard": (
            "cache",
            ["--teacher_weights", str(shards)],
            f"lacks 1 of the {len(files)} shards model.safetensors.index.json lists ({files[1]})",
        ),
        "missing tensor": (
            "export",
            [str(tensor), "--teacher"],
            "lacks 1 tensor(s) the SigLIP backbone hf_siglip_vit_w32_p16_depth2 needs: vision_model.head.probe",
        ),
        "bare file of unknown activation": (
            "train",
            ["--teacher_weights", str(bare / "clip.safetensors")],
            "bare CLIP weights file whose activation (OpenAI's quick-GELU or GELU)"
            " cannot be read from its tensors: put the model's config.json beside",
        ),
    }


MODULES = {
    "train": "train_student",
    "knn": "eval_knn",
    "cache": "tools.cache_teacher_features",
    "export": "tools.export",
}


def test_each_mistake_gets_one_sentence_through_the_command(tiny_data, snaps, tmp_path, caplog):
    common = {
        "train": [
            "--image_size",
            "32",
            "--batch_size",
            "8",
            "--epochs",
            "1",
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--exp_dir",
            str(tmp_path / "exp"),
        ],
        "knn": ["--resize_size", "32", "--crop_size", "32", "-j", "0", "--save", str(tmp_path / "k")],
        "cache": ["--out", str(tmp_path / "c.npy"), "--crop_size", "32", "--num_workers", "0"],
        "export": ["--format", "torchscript", "--out", str(tmp_path / "e.pt"), "--image_size", "32"],
    }
    for name, (command, argv, sentence) in _mistakes(tmp_path, snaps).items():
        module = importlib.import_module(MODULES[command])
        data = [] if command == "export" else [tiny_data]
        args = module.get_args_parser().parse_args(data + argv + common[command])
        caplog.clear()
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
            run_cli(module.main, args)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert exit_info.value.code == 2 and len(errors) == 1, (name, errors)
        assert sentence in errors[0] and "\n" not in errors[0] and "Traceback" not in errors[0], (name, errors[0])
