"""Fast JPEG decoding: same crop boxes and flips as the reference pipeline, pixels within stated tolerances.

Tolerances (uint8 levels, out of 255), measured on smooth synthetic photos (grain std 2):
- ``tv`` (libjpeg-turbo + torch's antialiased resize): mean |diff| <= 0.25, max <= 8;
- ``draft`` (DCT-domain 1/2..1/8 decoding, box mapped into the reduced image): mean <= 1.0, max <= 8.
A crop box shifted by 2 pixels gives a mean |diff| of about 3 on the same images, so these bounds
catch a wrong box mapping.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import decode as D
from data import transforms
from data.datasets import DataError, IndexedImageFolder, load_rgb
from data.synthetic import textured_image
from data.transforms import StrongAug, TrainViews, WeakAug, rrc_box

SIZE = 32  # output crop; 203x149 images then allow DCT reductions of 2 and 4


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        w, h = (203, 149) if i % 2 else (200, 150)  # odd sizes: partial DCT blocks
        path = str(root / f"{i}.jpg")
        textured_image(rng, w, h, grain=2.0).save(path, quality=90, progressive=i == 3)
        paths.append(path)
    return paths


def reference(path: str, seed: int, size: int = SIZE) -> torch.Tensor:
    aug = WeakAug(size, decode="pil")
    return aug(load_rgb(path), random.Random(seed))


def fast(path: str, seed: int, decoder: str, size: int = SIZE) -> torch.Tensor:
    aug = WeakAug(size, decode=decoder)
    img = aug.loader(path)
    assert isinstance(img, D.EncodedImage)
    return aug(img, random.Random(seed))


def test_jpeg_info_reads_the_frame_header(jpegs, tmp_path):
    assert D.jpeg_info(open(jpegs[1], "rb").read()) == (203, 149, 3)
    assert D.jpeg_info(open(jpegs[3], "rb").read()) == (203, 149, 3)  # progressive (SOF2)
    Image.open(jpegs[0]).convert("L").save(tmp_path / "g.jpg", quality=90)
    assert D.jpeg_info(open(tmp_path / "g.jpg", "rb").read()) == (200, 150, 1)
    png = io.BytesIO()
    Image.open(jpegs[0]).save(png, "PNG")
    assert D.jpeg_info(png.getvalue()) is None
    assert D.jpeg_info(b"\xff\xd8\xff") is None


def test_draft_scale():
    assert D.draft_scale(63, 200, 32) == 1
    assert D.draft_scale(64, 64, 32) == 2
    assert D.draft_scale(128, 200, 32) == 4
    assert D.draft_scale(1000, 900, 32) == 8
    assert D.draft_scale(448, 447, 224) == 1


@pytest.mark.parametrize("decoder", ["tv", "draft", "auto"])
def test_same_boxes_and_rng_draws_as_the_reference(jpegs, decoder, monkeypatch):
    seen = []
    real = D.DECODERS[decoder]
    monkeypatch.setitem(D.DECODERS, decoder, lambda img, box, size: seen.append(box) or real(img, box, size))
    for seed in range(6):
        rng_ref, rng_fast = random.Random(seed), random.Random(seed)
        img = load_rgb(jpegs[1])
        WeakAug(SIZE, decode="pil")(img, rng_ref)
        aug = WeakAug(SIZE, decode=decoder)
        aug(aug.loader(jpegs[1]), rng_fast)
        assert seen[-1] == rrc_box(203, 149, random.Random(seed))
        assert rng_ref.random() == rng_fast.random()  # box and flip consumed the same draws


def pixel_stats(decoder: str, jpegs: list[str], want_draft: bool | None = None) -> tuple[float, float, int]:
    worst_mean, worst_max, n = 0.0, 0.0, 0
    for path in jpegs:
        w, h = Image.open(path).size
        for seed in range(12):
            box = rrc_box(w, h, random.Random(seed))
            if want_draft is not None and (D.draft_scale(box[2], box[3], SIZE) > 1) != want_draft:
                continue
            diff = (reference(path, seed).float() - fast(path, seed, decoder).float()).abs()
            worst_mean, worst_max, n = max(worst_mean, diff.mean().item()), max(worst_max, diff.max().item()), n + 1
    return worst_mean, worst_max, n


def test_tv_decoder_pixels_match_the_reference(jpegs):
    worst_mean, worst_max, n = pixel_stats("tv", jpegs)
    assert n == 48
    assert worst_mean <= 0.25 and worst_max <= 8


def test_draft_decoder_maps_the_box_into_the_reduced_image(jpegs):
    worst_mean, worst_max, n = pixel_stats("draft", jpegs, want_draft=True)
    assert n >= 10  # the reduced decode really ran
    assert worst_mean <= 1.0 and worst_max <= 8


def test_auto_uses_draft_on_large_images_when_the_crop_keeps_the_output_resolution(jpegs, monkeypatch):
    calls = []
    monkeypatch.setattr(D, "decode_draft", lambda img, box, size: calls.append("draft") or D.decode_pil(img, box, size))
    monkeypatch.setattr(D, "decode_tv", lambda img, box, size: calls.append("tv") or D.decode_pil(img, box, size))
    img = D.open_image(jpegs[0])
    D.decode_auto(img, (0, 0, 64, 70), 32)  # 200x150: too small for draft to pay
    monkeypatch.setattr(D, "DRAFT_MIN_PIXELS", 200 * 150)
    D.decode_auto(img, (0, 0, 64, 70), 32)
    D.decode_auto(img, (0, 0, 63, 150), 32)
    assert calls == ["tv", "draft", "tv"]


def test_grey_jpeg_takes_the_fast_path_with_the_same_pixels(jpegs, tmp_path):
    path = str(tmp_path / "grey.jpg")
    Image.open(jpegs[0]).convert("L").save(path, quality=90)
    for seed in range(4):
        out = fast(path, seed, "tv")
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8
        assert (out.float() - reference(path, seed).float()).abs().mean() <= 0.25


def test_other_files_take_the_reference_path(jpegs, tmp_path):
    png, cmyk, cut = str(tmp_path / "a.png"), str(tmp_path / "c.jpg"), str(tmp_path / "cut.jpg")
    Image.open(jpegs[0]).save(png)
    Image.open(jpegs[0]).convert("CMYK").save(cmyk, quality=90)
    data = open(jpegs[0], "rb").read()
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    for path in (png, cmyk):
        img = D.open_image(path)
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert torch.equal(WeakAug(SIZE, decode="auto")(img, random.Random(1)), reference(path, 1))
    with pytest.raises(DataError, match="cut.jpg"):  # truncated: the reference's clear error, not grey pixels
        D.open_image(cut)
    with pytest.raises(DataError, match="missing.jpg"):
        D.open_image(str(tmp_path / "missing.jpg"))


def test_dataset_opens_files_the_way_its_transform_asks(jpegs, tmp_path):
    for i, path in enumerate(jpegs):
        os.makedirs(tmp_path / "c", exist_ok=True)
        os.link(path, tmp_path / "c" / f"{i}.jpg")
    single = IndexedImageFolder(str(tmp_path), TrainViews(SIZE, True, True, False, decode="tv"), seed=3)
    ref = IndexedImageFolder(str(tmp_path), TrainViews(SIZE, True, True, False, decode="pil"), seed=3)
    assert single.transform.loader is D.open_image and ref.transform.loader is load_rgb
    for key in [(0, 1), (3, 2)]:
        a, b = single[key][0], ref[key][0]
        assert (a.float() - b.float()).abs().mean() <= 0.25
    pair = TrainViews(SIZE, False, True, False, decode="auto")
    assert pair.loader is load_rgb  # two views: one full decode shared by both


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="unknown decoder"):
        WeakAug(32, decode="nvjpeg")


@pytest.mark.parametrize("cls", [WeakAug, StrongAug])
def test_crop_scale_and_no_flip_draw_the_box_from_the_scale_and_never_flip(jpegs, cls, monkeypatch):
    boxes, flipped = [], []
    monkeypatch.setattr(transforms, "rrc_box", lambda *a, **k: boxes.append(rrc_box(*a, **k)) or boxes[-1])
    monkeypatch.setattr(Image.Image, "transpose", lambda img, op: flipped.append(op) or img)
    img = load_rgb(jpegs[0])
    for seed in range(40):
        cls(SIZE, (0.6, 1.0), flip=False, decode="pil")(img, random.Random(seed))
    assert not flipped and len(boxes) == 40
    assert min(w * h for _, _, w, h in boxes) >= 0.6 * img.width * img.height * 0.98  # rounding of w and h
    for seed in range(40):  # the default views flip about half the time
        cls(SIZE, decode="pil")(img, random.Random(seed))
    assert 10 <= len(flipped) <= 30


def test_views_name_other_crops_and_keep_the_papers_names():
    assert TrainViews(SIZE, True, True, False).name == "single weak view"
    assert TrainViews(SIZE, False, False, True, min_scale=0.2, flip=True).name == "teacher weak / student strong"
    views = TrainViews(SIZE, True, True, False, min_scale=0.6, flip=False)
    assert views.name == "single weak view (crop scale 0.6-1, no flip)"
    assert views.record(3) == {"mode": views.name, "image_size": SIZE, "seed": 3, "decode": "auto"}
    assert TrainViews(SIZE, False, True, False, flip=False).name == "teacher weak / student weak (no flip)"
    assert views.student.scale == views.teacher.scale == (0.6, 1.0) and not views.student.flip
