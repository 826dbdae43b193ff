"""K-view teacher cache: rows are the live teacher on the loader's crops, training on it equals live
training, mismatched crops are refused, the build is resumable, costs one forward per row, and 2 ranks
equal 1."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import train_student
from data.datasets import IndexedImageFolder, dataset_fingerprint
from data.transforms import TeacherView, TrainViews
from models.errors import UserError
from models.teachers import load_teacher
from tests.conftest import write_random_resnet18
from tests.test_teacher_cache import Counting, free_port
from tools import cache_teacher_features
from tools.engine.distributed import DistInfo
from tools.teacher_cache import builder as teacher_cache
from tools.teacher_cache.builder import build_cache
from tools.teacher_cache.reader import CachedTeacher, manifest_path, open_cached_teacher, read_manifest

N_IMAGES, SIZE = 12, 32
SINGLE_WEAK = ("--single_aug", "--weak_weak")  # the paper's views
VIEW_FLAGS = [*SINGLE_WEAK, "--image_size", str(SIZE)]


def write_jpegs(root, n: int = N_IMAGES, classes=("ant", "bee", "cat")) -> None:
    """Smooth random pictures (different crops look different), as JPEGs so the fast decoders run."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / "train" / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = 48 + 4 * (i % 3), 40 + 2 * (i % 4)
        coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
        coarse.resize((w, h), Image.BICUBIC).save(folder / f"img{i:02d}.jpg", quality=92)


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpegs(root)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random ResNet-18 teacher in torchvision's layout (BatchNorm statistics away from 0 and 1)."""
    return write_random_resnet18(tmp_path_factory.mktemp("teacher") / "r18.pth")


def build_argv(data, weights: str, out, views: int = 0, *extra: str, modes=SINGLE_WEAK) -> list[str]:
    argv = [str(data), "--teacher_weights", weights, "--out", str(out), "--batch_size", "5", "--num_workers", "0"]
    argv += ["--device", "cpu", *modes, "--image_size", str(SIZE), *extra]
    return argv + (["--views", str(views)] if views else ["--resize_size", "36", "--crop_size", str(SIZE)])


def build(data, weights: str, out, views: int = 0, *extra: str, modes=SINGLE_WEAK) -> str:
    argv = build_argv(data, weights, out, views, *extra, modes=modes)
    args = cache_teacher_features.get_args_parser().parse_args(argv)
    cache_teacher_features.main(args)
    return str(out)


def training_crops(data, epoch: int, seed: int = 0, decode: str = "auto", **views) -> torch.Tensor:
    """The crops the training loader gives every image in ``epoch`` (single weak view unless told), (N, 3, S, S)."""
    modes = {"single": True, "weak_weak": True, "weak_strong": False, "min_scale": 0.2, "flip": True, **views}
    transform = TrainViews(SIZE, modes.pop("single"), modes.pop("weak_weak"), modes.pop("weak_strong"), decode, **modes)
    dataset = IndexedImageFolder(str(data / "train"), TeacherView(transform), seed=seed)
    return torch.stack([dataset[(i, epoch)][0] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def three_views(data, weights, tmp_path_factory) -> str:
    return build(data, weights, tmp_path_factory.mktemp("kview") / "r18_3views.npy", 3)


def assert_fp16_rounding(cached: np.ndarray, live: np.ndarray) -> None:
    """``cached`` is ``live`` rounded to float16 (half an ulp: 2^-11 relative), up to float32 noise."""
    np.testing.assert_allclose(cached.astype(np.float32), live, rtol=2**-11 + 1e-5, atol=1e-6)


def test_each_row_is_the_live_teacher_on_the_loaders_crop_of_that_epoch(three_views, data, weights):
    cached, teacher = np.load(three_views, mmap_mode="r"), load_teacher(weights)
    assert cached.dtype == np.float16 and cached.shape == (3, N_IMAGES, 512)
    live = [teacher(training_crops(data, epoch).float() / 255).numpy() for epoch in (1, 2, 3)]
    for v in range(3):
        assert_fp16_rounding(cached[v], live[v])
    assert np.abs(live[0] - live[1]).max() > 100 * np.abs(cached[0] - live[0]).max()  # views do differ
    manifest = read_manifest(three_views)
    views = {"mode": "single weak view", "image_size": SIZE, "seed": 0, "decode": "auto", "n_views": 3}
    assert manifest["views"] == views and manifest["shape"] == [3, N_IMAGES, 512] and manifest["version"] == 3
    assert manifest["n_images"] == N_IMAGES and manifest["classes"] == ["ant", "bee", "cat"]
    assert manifest["teacher"]["arch"] == "resnet18" and manifest["rows_built"] == 3 * N_IMAGES
    assert manifest["paths_sha256"] == dataset_fingerprint(IndexedImageFolder(str(data / "train")))["paths_sha256"]


def test_other_crop_scale_and_no_flip_cache_the_crops_training_draws(data, weights, tmp_path):
    out = build(data, weights, tmp_path / "s06.npy", 2, "--min_crop_scale", "0.6", "--no_flip")
    teacher = load_teacher(weights)
    for v in (1, 2):
        crops = training_crops(data, v, min_scale=0.6, flip=False)
        assert_fp16_rounding(np.load(out)[v - 1], teacher(crops.float() / 255).numpy())
    assert read_manifest(out)["views"]["mode"] == "single weak view (crop scale 0.6-1, no flip)"


def test_pair_modes_cache_the_teachers_view(data, weights, tmp_path):
    out = build(data, weights, tmp_path / "ws.npy", 2, modes=("--weak_strong",))  # teacher weak, student strong
    teacher = load_teacher(weights)
    for v in (1, 2):
        crops = training_crops(data, v, single=False, weak_strong=True)
        assert_fp16_rounding(np.load(out)[v - 1], teacher(crops.float() / 255).numpy())
    assert read_manifest(out)["views"]["mode"] == "teacher weak / student strong"
    assert read_manifest(out)["views"]["decode"] == "pil"  # pairs decode with PIL whatever --decode says


def test_cached_teacher_serves_view_of_epoch_modulo_k(three_views, data):
    rows = np.load(three_views).astype(np.float32)
    index = torch.tensor([7, 0, 7, 11, 3])
    fingerprint = dataset_fingerprint(IndexedImageFolder(str(data / "train")))
    for on_device in (False, True):
        cached = CachedTeacher(three_views, fingerprint, "cpu", on_device=on_device)
        assert cached.view_period == 3 and cached.feat_dim == 512 and (cached.table is not None) == on_device
        for epoch, view in [(1, 1), (2, 2), (3, 3), (4, 1), (8, 2)]:
            cached.set_epoch(epoch)
            out = cached.targets(torch.zeros(5, 3, SIZE, SIZE), index)
            np.testing.assert_array_equal(out.numpy(), rows[view - 1][index.numpy()])


def test_loader_crops_repeat_with_the_cache_period(data):
    transform = TeacherView(TrainViews(SIZE, True, True, False))
    dataset = IndexedImageFolder(str(data / "train"), transform, seed=0)
    assert not torch.equal(dataset[(5, 4)][0], dataset[(5, 1)][0])
    dataset.epoch_period = 3
    for epoch, same_as in [(4, 1), (6, 3), (7, 1), (2, 2)]:
        assert torch.equal(dataset[(5, epoch)][0], training_crops(data, same_as)[5])


@pytest.mark.parametrize(
    "run, message",
    [
        ({"seed": 1}, r"holds the crops of --seed 0, but this run's --seed is 1"),
        ({"image_size": 48}, r"holds 32 px crops, but this run's --image_size is 48"),
        ({"decode": "pil"}, r"holds crops decoded with --decode auto, but this run decodes with --decode pil"),
        ({"mode": "single strong view"}, r"holds single weak view crops, but this run uses single strong view"),
        (
            {"mode": "single weak view (no flip)"},
            r"holds single weak view crops, but this run uses single weak view \(no flip\)",
        ),
    ],
)
def test_cache_of_other_crops_is_refused(three_views, data, run, message):
    fingerprint = dataset_fingerprint(IndexedImageFolder(str(data / "train")))
    views = {**TrainViews(SIZE, True, True, False).record(0), **run}
    with pytest.raises(UserError, match=message + "; train with the cache's"):
        open_cached_teacher(three_views, fingerprint, torch.device("cpu"), views=views)


def train_flags(data, exp, *extra: str) -> list[str]:
    flags = [str(data), "--arch_student", "resnet18", "--n_mlp_layers", "2", "--batch_size", "4"]
    flags += ["--num_workers", "0", "--device", "cpu", "--print_freq", "100", "--exp_dir", str(exp)]
    return flags + VIEW_FLAGS + list(extra)


def train(data, exp, *extra: str) -> list[float]:
    """Run train_student.py; returns the epoch losses of its log."""
    train_student.main(train_student.get_args_parser().parse_args(train_flags(data, exp, *extra)))
    with open(exp / "logs" / "train_log.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def test_training_refuses_a_cache_of_another_seed(three_views, data, tmp_path):
    with pytest.raises(UserError, match="holds the crops of --seed 0, but this run's --seed is 3"):
        train(data, tmp_path / "e", "--use_cache", "--teacher_feats", three_views, "--seed", "3")


@pytest.mark.slow
def test_frozen_student_sees_the_live_losses_from_a_two_view_cache(data, weights, tmp_path, caplog):
    live = ("--teacher_weights", weights)
    train(data, tmp_path / "trained", *live, "--epochs", "4")  # a student that fits the teacher somewhat
    frozen = ("--weights", str(tmp_path / "trained" / "checkpoints" / "checkpoint_latest.pth"), "--learning_rate", "0")
    live_losses = train(data, tmp_path / "live", *live, *frozen, "--epochs", "2")
    views = build(data, weights, tmp_path / "two.npy", 2)
    centre = build(data, weights, tmp_path / "centre.npy", modes=())
    cached = train(data, tmp_path / "cached", "--use_cache", "--teacher_feats", views, *frozen, "--epochs", "2")
    centred = train(data, tmp_path / "centred", "--use_cache", "--teacher_feats", centre, *frozen, "--epochs", "2")
    assert len(live_losses) == len(cached) == 2 and live_losses[0] != live_losses[1]
    np.testing.assert_allclose(cached, live_losses, rtol=1e-3)
    # The centre crop's targets are another image's: 6% and 1% off here (the 2-view cache: 2e-5).
    assert min(abs(c - v) / v for c, v in zip(centred, live_losses, strict=True)) > 5e-3
    with caplog.at_level(logging.INFO):
        train(data, tmp_path / "three", "--use_cache", "--teacher_feats", views, *frozen, "--epochs", "3")
    assert caplog.text.count("holds 2 views for 3 epochs") == 1
    other = build(data, weights, tmp_path / "three.npy", 3)  # other targets: the run cannot continue on them
    with pytest.raises(UserError, match="belongs to a different run"):
        train(data, tmp_path / "cached", "--use_cache", "--teacher_feats", other, *frozen, "--epochs", "3")


def test_interrupted_build_resumes_with_only_the_missing_rows(data, weights, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "FLUSH_SECONDS", -1.0)  # flush after every batch
    transform = TeacherView(TrainViews(SIZE, True, True, False))
    dataset, teacher = IndexedImageFolder(str(data / "train"), transform, seed=0), load_teacher(weights)
    manifest = {"teacher": {"arch": "resnet18"}, "preprocessing": {}, "views": transform.views.record(0)}
    out, kwargs = str(tmp_path / "feats.npy"), {"batch_size": 5, "num_workers": 0, "dist_info": DistInfo()}
    with pytest.raises(KeyboardInterrupt):
        build_cache(Counting(teacher, fail_after=4), dataset, out, manifest, n_views=3, **kwargs)
    assert not os.path.exists(out) and np.load(out + ".done.npy").sum() == 20
    second = Counting(teacher)
    build_cache(second, dataset, out, manifest, n_views=3, **kwargs)
    assert (second.calls, second.images) == (4, 16)  # the 16 missing rows of 36, in batches of 5
    rows = np.load(out)
    for v in (1, 2, 3):
        assert_fp16_rounding(rows[v - 1], teacher(training_crops(data, v).float() / 255).numpy())
    again = Counting(teacher)
    build_cache(again, dataset, out, manifest, n_views=3, **kwargs)  # complete: nothing to do
    assert again.images == 0
    with pytest.raises(UserError, match="built with other settings"):
        build_cache(teacher, dataset, out, manifest, n_views=4, **kwargs)


def test_a_full_build_costs_one_forward_per_row(data, weights, tmp_path):
    transform = TeacherView(TrainViews(SIZE, True, True, False))
    dataset, counting = IndexedImageFolder(str(data / "train"), transform), Counting(load_teacher(weights))
    manifest = {"teacher": {}, "preprocessing": {}, "views": transform.views.record(0)}
    build_cache(counting, dataset, str(tmp_path / "f.npy"), manifest, batch_size=8, num_workers=0,
                dist_info=DistInfo(), n_views=4)  # fmt: skip
    assert read_manifest(str(tmp_path / "f.npy"))["views"]["n_views"] == 4
    assert (counting.calls, counting.images) == (6, 4 * N_IMAGES)


def _cache_rank(rank: int, argv: list[str], port: int) -> None:
    """One torchrun-like worker of tools.cache_teacher_features (spawned by the test below)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_equals_one_rank(three_views, data, weights, tmp_path):
    out = tmp_path / "two_ranks.npy"
    torch.multiprocessing.spawn(_cache_rank, args=(build_argv(data, weights, out, 3), free_port()), nprocs=2)
    one, two = np.load(three_views), np.load(out)
    assert two.shape == one.shape == (3, N_IMAGES, 512)
    np.testing.assert_array_equal(two, one)
    same = {"teacher", "preprocessing", "views", "shape", "n_images", "paths_sha256", "classes", "rows_built"}
    m1, m2 = read_manifest(three_views), read_manifest(str(out))
    assert {k: m1[k] for k in same} == {k: m2[k] for k in same} and m2["world_size"] == 2


def test_centre_crop_cache_of_before_the_views_section_still_reads(data, weights, tmp_path):
    out = build(data, weights, tmp_path / "centre.npy", modes=())
    manifest = read_manifest(out)
    assert manifest["views"] == {"mode": "centre crop", "n_views": 1} and manifest["shape"] == [N_IMAGES, 512]
    old = {k: v for k, v in manifest.items() if k != "views"}
    with open(manifest_path(out), "w") as f:
        json.dump({**old, "version": 2}, f)
    cached = CachedTeacher(out, dataset_fingerprint(IndexedImageFolder(str(data / "train"))))
    cached.set_epoch(5)  # every epoch reads the one centre-crop row
    assert cached.view_period is None and cached.views["mode"] == "centre crop"
    np.testing.assert_array_equal(cached.targets(torch.zeros(2, 3, 1, 1), torch.tensor([3, 1])).numpy(),
                                  np.load(out)[[3, 1]].astype(np.float32))  # fmt: skip


@pytest.mark.slow
def test_cache_benchmark_runs_and_measures_what_it_says(tmp_path):
    from tools import benchmark

    argv = ["cache", "--work_dir", str(tmp_path), "--images", "8", "--set", "views=2", "--set", "teacher=resnet18"]
    argv += ["--set", "step_size=32", "--set", "step_batch=4", "--set", "step_iters=1", "--rounds", "1"]
    argv += ["--set", "workers=0", "--jpeg_size", "64x48"]
    rows = benchmark.main(benchmark.get_args_parser().parse_args([*argv, "--json", str(tmp_path / "r.json")]))
    build, steps = rows[0], rows[1:]
    header = os.path.getsize(tmp_path / "cache_8192d_8images.npy") - 2 * 8 * 8192 * 2  # the .npy header, once per file
    assert build["bytes_per_row"] == {512: 1024 + header / 16, 8192: 16384 + header / 16}
    configs = ["live teacher", "cached, memory-mapped", "cached, on the device", "live teacher (repeat)"]
    assert [r["config"] for r in steps] == configs
    assert steps[0]["ratio_vs_baseline"] == 1.0 and json.load(open(tmp_path / "r.json"))[0]["rows_per_s"] > 0


def test_caches_of_different_k_in_one_run_are_refused(three_views, data, weights, tmp_path):
    two = build(data, weights, tmp_path / "two.npy", 2)
    with pytest.raises(UserError, match=r"hold different numbers of views \(2, 3\); .* same --views K"):
        train(data, tmp_path / "e", "--use_cache", "--teacher_feats", three_views, two)


@pytest.mark.slow
def test_two_teachers_k_view_cache_beside_a_live_one_is_the_two_live_teachers(data, weights, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "r18_other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    views = build(data, weights, tmp_path / "two.npy", 2)
    both = ("--teacher_weights", weights, str(other), "--epochs", "2", "--learning_rate", "0")  # targets only
    train(data, tmp_path / "live", *both)
    train(data, tmp_path / "mixed", *both, "--use_cache", "--teacher_feats", views, "-")
    live, mixed = (per_teacher_losses(tmp_path / name) for name in ("live", "mixed"))
    np.testing.assert_allclose(mixed[0], live[0], rtol=1e-3)  # the cached teacher: to fp16 rounding
    assert mixed[0] != live[0] and mixed[1] == live[1]  # the live teacher: the same crops, bit for bit


def per_teacher_losses(exp) -> list[list[float]]:
    """[[loss_teacher_k of each epoch] for k = 1, 2] from a run's log."""
    with open(exp / "logs" / "train_log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [[r[f"loss_teacher_{k}"] for r in records] for k in (1, 2)]


def test_device_decoded_view_cache_holds_the_device_decoders_crops(data, weights, tmp_path):
    # --decode gpu on a CPU build decodes with the same batched code as a CPU run of training does.
    out = build(data, weights, tmp_path / "gpu.npy", 1, "--decode", "gpu")
    assert read_manifest(out)["views"]["decode"] == "gpu"
    transform = TrainViews(SIZE, True, True, False, "gpu")
    dataset = IndexedImageFolder(str(data / "train"), TeacherView(transform), seed=0)
    batch = transform.collate([dataset[(i, 1)] for i in range(N_IMAGES)])[0].decode(torch.device("cpu"))
    assert_fp16_rounding(np.load(out)[0], load_teacher(weights)(batch.float() / 255).numpy())
    with pytest.raises(UserError, match="decoded with --decode gpu, but this run decodes with --decode auto"):
        train(data, tmp_path / "e", "--use_cache", "--teacher_feats", out)
