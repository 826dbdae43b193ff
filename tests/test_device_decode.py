"""Device decoding (``--decode gpu``): the CPU pipeline's crop boxes and flips, its pixels, per-image fallbacks.

On this CPU machine the decoding device is the CPU, which runs the same batched code as a GPU: its
crops must equal the ``tv`` decoder's exactly (both are libjpeg-turbo plus torch's antialiased resize)
and stay within the reference tolerances of tests/test_decode.py (mean |diff| <= 0.25, max <= 8 levels).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import train_student
from data import device_decode as DD
from data.datasets import DataError, IndexedImageFolder
from data.loaders import build_loader
from data.synthetic import textured_image
from data.transforms import TrainViews, rrc_box
from models.errors import UserError

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """One class of 6 JPEGs (odd sizes, a progressive and a grey one), a PNG and a CMYK JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    os.makedirs(root / "c")
    rng = np.random.default_rng(0)
    for i in range(6):
        img = textured_image(rng, *((203, 149) if i % 2 else (200, 150)), grain=2.0)
        img = img.convert("L") if i == 4 else img
        img.save(root / "c" / f"{i}.jpg", quality=90, progressive=i == 3)
    textured_image(rng, 180, 140, grain=2.0).save(root / "c" / "6.png")
    textured_image(rng, 170, 150, grain=2.0).convert("CMYK").save(root / "c" / "7.jpg", quality=90)
    return str(root)


def views(decode: str) -> TrainViews:
    return TrainViews(SIZE, True, True, False, decode=decode)


def test_workers_draw_the_cpu_decoders_box_and_flip(folder):
    ds = IndexedImageFolder(folder, views("gpu"), seed=3)
    for index in range(6):
        crop, _, i = ds[(index, 2)]
        assert isinstance(crop, DD.EncodedCrop) and i == index
        rng = ds.rng(index, 2)
        w, h = Image.open(os.path.join(folder, ds.samples[index][0])).size
        assert (crop.box, crop.height, crop.width) == (rrc_box(w, h, rng), h, w)
        assert crop.flip == (rng.random() < 0.5)  # the next draw, as WeakAug's CPU path takes it


def test_batched_cpu_decoding_equals_the_tv_decoder_and_stays_near_the_reference(folder):
    gpu, tv, pil = (IndexedImageFolder(folder, views(d), seed=2) for d in ("gpu", "tv", "pil"))
    keys = [(i, 7) for i in range(len(gpu))]
    batch, labels, index = DD.collate_encoded([gpu[k] for k in keys])
    assert batch.slots == [0, 1, 2, 3, 4, 5] and batch.decoded_slots == [6, 7]  # PNG and CMYK: made in the worker
    out = batch.decode("cpu")
    assert out.shape == (8, 3, SIZE, SIZE) and out.dtype == torch.uint8
    assert torch.equal(index, torch.arange(8)) and torch.equal(labels, torch.zeros(8, dtype=torch.long))
    flips = 0
    for k in keys:
        i = k[0]
        assert torch.equal(out[i], tv[k][0]), i
        diff = (out[i].float() - pil[k][0].float()).abs()
        assert diff.mean() <= 0.25 and diff.max() <= 8
        flips += bool(gpu[k][0].flip) if i < 6 else 0
    assert 0 < flips < 6  # both branches of the flip ran


def test_png_and_cmyk_in_a_jpeg_folder_fall_back_and_are_counted(folder):
    ds = IndexedImageFolder(folder, views("gpu"), seed=1)
    ref = IndexedImageFolder(folder, views("pil"), seed=1)
    loader = build_loader(ds, 4, num_workers=1, shuffle=False, drop_last=False)
    assert loader.collate_fn is DD.collate_encoded  # the transform asked for its own collation
    seen = []
    for batch, _, index in loader:
        assert isinstance(batch, DD.EncodedBatch)
        seen += [(int(i), img) for i, img in zip(index, batch.decode("cpu"), strict=True)]
    assert ds.transform.decode_stats() == {"cpu_decoded_images": 2}  # counted across the worker process
    for i, img in seen[6:]:
        assert torch.equal(img, ref[(i, 0)][0])  # the reference path, bit for bit
    assert views("tv").decode_stats() == {}


def test_a_file_the_decoder_rejects_is_named(folder, monkeypatch):
    ds = IndexedImageFolder(folder, views("gpu"), seed=0)
    batch, _, _ = DD.collate_encoded([ds[(i, 0)] for i in range(2)])

    def failing(data, mode=None, device=None):
        raise RuntimeError("bad Huffman code")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    with pytest.raises(DataError, match=r"0\.jpg"):
        batch.decode("cpu")


def test_resolve_decode_picks_the_device_for_jpegs_on_cuda_only():
    cuda, cpu, yes = torch.device("cuda"), torch.device("cpu"), (lambda device: True)
    jpegs, pngs = ["a/1.JPEG", "a/2.jpg"], ["a/1.png", "a/2.jpg"]
    assert DD.resolve_decode("auto", cuda, jpegs, True, yes) == "gpu"
    assert DD.resolve_decode("auto", cuda, pngs, True, yes) == "auto"  # mostly not JPEG: the workers decode
    assert DD.resolve_decode("auto", cuda, jpegs, False, yes) == "auto"  # two views: one full CPU decode each
    assert DD.resolve_decode("auto", cuda, jpegs, True, lambda device: False) == "auto"
    assert DD.resolve_decode("auto", cpu, jpegs, True) == "auto"
    assert DD.resolve_decode("cpu", cuda, jpegs, True, yes) == "auto"  # the CPU rule of data.decode
    assert DD.resolve_decode("tv", cuda, jpegs, True, yes) == "tv"
    assert DD.resolve_decode("gpu", cpu, jpegs, True) == "gpu"  # the same code with the CPU as the device
    with pytest.raises(UserError, match="single weak view"):
        DD.resolve_decode("gpu", cpu, jpegs, False)
    with pytest.raises(UserError, match="use --decode cpu"):
        DD.resolve_decode("gpu", cuda, jpegs, True, lambda device: False)
    assert DD.device_can_decode(cpu)


def test_auto_keeps_this_mixed_folder_on_the_cpu(folder):
    """7 of the folder's 8 files are named .jpg (one of them CMYK): below the share auto asks for on CUDA."""
    paths = [p for p, _ in IndexedImageFolder(folder, views("gpu")).samples]
    assert DD.jpeg_share(paths) == 0.875 < DD.JPEG_SHARE_FOR_AUTO
    assert DD.resolve_decode("auto", torch.device("cuda"), paths, True, lambda device: True) == "auto"
    assert DD.resolve_decode("auto", torch.device("cuda"), paths[:6], True, lambda device: True) == "gpu"


def train_args(data: str, teacher: str, exp: str, decode: str, device: str = "cpu") -> list[str]:
    return [data, "--teacher_weights", teacher, "--image_size", str(SIZE), "--batch_size", "8", "--epochs", "1",
            "--num_workers", "1", "--single_aug", "--weak_weak", "--decode", decode, "--exp_dir", exp,
            "--device", device]  # fmt: skip


@pytest.mark.slow
def test_training_with_decode_gpu_on_the_cpu_equals_decode_tv(folder, tmp_path, resnet18_teacher_file):
    os.makedirs(tmp_path / "data")
    os.symlink(folder, tmp_path / "data" / "train")
    weights = {}
    for decode in ("gpu", "tv"):
        exp = str(tmp_path / decode)
        args = train_student.get_args_parser().parse_args(train_args(str(tmp_path / "data"), resnet18_teacher_file,
                                                                      exp, decode))  # fmt: skip
        train_student.main(args)
        weights[decode] = torch.load(os.path.join(exp, "checkpoints", "student_backbone.pth"), weights_only=True)
        log = [json.loads(ln) for ln in open(os.path.join(exp, "logs", "train_log.jsonl"))]
        assert log[-1].get("cpu_decoded_images") == (2 if decode == "gpu" else None)
    assert all(torch.equal(weights["gpu"][k], weights["tv"][k]) for k in weights["tv"])


# ============ on a GPU (tools/gpu_check.sh runs these) ============
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_matches_the_cpu_batch(folder):
    ds = IndexedImageFolder(folder, views("gpu"), seed=5)
    batch, _, _ = DD.collate_encoded([ds[(i, 7)] for i in range(len(ds))])
    cpu, gpu = batch.decode("cpu"), batch.decode("cuda")
    assert gpu.device.type == "cuda"
    diff = (cpu.float() - gpu.cpu().float()).abs()
    assert diff.mean() <= 1.0 and diff.max() <= 16  # nvJPEG's IDCT and chroma upsampling differ slightly
    assert torch.equal(cpu[6:], gpu[6:].cpu())  # the worker-made crops travel unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_training_step_with_decode_gpu_on_cuda(folder, tmp_path, resnet18_teacher_file):
    """``--decode gpu`` asked for by name: this folder is 2 of 8 files short of all-JPEG, so ``auto`` would decode
    on the CPU (test_auto_keeps_this_mixed_folder_on_the_cpu); the JPEG-only folder shows ``auto`` on the device."""
    os.makedirs(tmp_path / "data")
    os.symlink(folder, tmp_path / "data" / "train")
    stats = {}
    for decode in ("gpu", "cpu"):
        argv = train_args(str(tmp_path / "data"), resnet18_teacher_file, str(tmp_path / decode), decode, "cuda")
        torch.manual_seed(0)
        stats[decode] = train_student.main(train_student.get_args_parser().parse_args([*argv, "--channels_last"]))
    assert stats["gpu"]["steps"] == 1 and stats["gpu"]["cpu_decoded_images"] == 2
    assert "cpu_decoded_images" not in stats["cpu"]
    # the same weights and crops; only nvJPEG's pixel rounding and bf16 differ
    assert stats["gpu"]["loss"] == pytest.approx(stats["cpu"]["loss"], rel=2e-2)
    jpegs = tmp_path / "jpegs"
    os.makedirs(jpegs / "train" / "c")
    for i in range(6):
        os.symlink(os.path.join(folder, "c", f"{i}.jpg"), jpegs / "train" / "c" / f"{i}.jpg")
    argv = [*train_args(str(jpegs), resnet18_teacher_file, str(tmp_path / "auto"), "auto", "cuda"), "--batch_size", "6"]
    auto = train_student.main(train_student.get_args_parser().parse_args(argv))
    assert auto["steps"] == 1 and auto["cpu_decoded_images"] == 0  # auto chose device decoding
