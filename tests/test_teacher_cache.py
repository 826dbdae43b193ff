"""Teacher feature cache: build (2-rank gloo, resumable), manifest checks, gathering, training with it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import IndexedImageFolder, dataset_fingerprint
from data.transforms import CenterCrop
from models.errors import UserError
from models.io import safe_load
from models.teachers import load_teacher
from tests.conftest import write_random_resnet18
from tools.engine.distributed import DistInfo
from tools.engine.step import autocast
from tools.teacher_cache import builder as teacher_cache
from tools.teacher_cache.builder import build_cache, plan_rank
from tools.teacher_cache.reader import CachedTeacher, manifest_path, open_cached_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 11  # odd: two ranks with batches of 2 need padding


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest


def write_images(root, n: int = N_IMAGES, classes=("ant", "bee", "cat")) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        size = (40 + 4 * (i % 3), 36 + 2 * (i % 4))  # not square, not the crop size
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_images(root)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_resnet18(tmp_path_factory.mktemp("teacher") / "r18.pth")


def crops(data_root) -> IndexedImageFolder:
    return IndexedImageFolder(str(data_root / "train"), CenterCrop(36, 32))


def live_features(weights: str, dataset) -> np.ndarray:
    teacher = load_teacher(weights)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255
    return teacher(x).numpy()


MANIFEST = {"teacher": {"arch": "resnet18", "format": "torchvision", "use_fc": False, "weights_sha256": "x"}}
MANIFEST["preprocessing"] = {"resize_size": 36, "crop_size": 32}


class Counting(torch.nn.Module):
    """A teacher that counts the images it sees and can fail after some batches (an interrupted build)."""

    def __init__(self, teacher, fail_after: int | None = None) -> None:
        super().__init__()
        self.teacher, self.feat_dim, self.fail_after = teacher, teacher.feat_dim, fail_after
        self.images, self.calls = 0, 0

    def forward(self, x):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images += len(x)
        return self.teacher(x)


def test_plan_gives_each_pending_index_to_one_rank_in_the_same_number_of_steps():
    pending = np.array([0, 2, 3, 5, 6, 7, 9])
    parts = [plan_rank(pending, r, 2, 2) for r in range(2)]
    assert [p.tolist() for p in parts[0]] == [[0, 2], [6, 7]]
    assert [p.tolist() for p in parts[1]] == [[3, 5], [9]]  # nothing padded: no row is computed twice
    assert [p.tolist() for p in plan_rank(np.array([4]), 1, 2, 2)] == [[]]  # a step with no rows for rank 1


def _cache_rank(rank: int, argv: list[str], port: int) -> None:
    """One torchrun-like worker of tools.cache_teacher_features (spawned by the test below)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from tools import cache_teacher_features

    cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_build_equals_live_teacher_in_dataset_order(data, weights, tmp_path):
    out = tmp_path / "feats.npy"
    argv = [str(data), "--teacher_weights", weights, "--out", str(out), "--resize_size", "36", "--crop_size", "32"]
    argv += ["--batch_size", "2", "--num_workers", "0", "--device", "cpu"]
    torch.multiprocessing.spawn(_cache_rank, args=(argv, free_port()), nprocs=2)
    cached = np.load(out, mmap_mode="r")
    dataset = crops(data)
    assert cached.dtype == np.float16 and cached.shape == (N_IMAGES, 512)
    live = live_features(weights, dataset)
    np.testing.assert_allclose(cached.astype(np.float32), live, rtol=2e-3, atol=2e-3 * np.abs(live).max())
    manifest = json.loads(open(manifest_path(str(out))).read())
    assert manifest["n_images"] == N_IMAGES and manifest["classes"] == ["ant", "bee", "cat"]
    assert manifest["shape"] == [N_IMAGES, 512] and manifest["world_size"] == 2
    assert manifest["teacher"]["arch"] == "resnet18" and manifest["teacher"]["format"] == "torchvision"
    assert manifest["teacher"]["weights_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert manifest["preprocessing"]["crop_size"] == 32 and manifest["preprocessing"]["resize_size"] == 36
    assert not [p for p in os.listdir(tmp_path) if "partial" in p or "done" in p]


def test_a_cache_built_under_bf16_holds_the_live_bf16_targets(data, weights, tmp_path):
    """The builder runs the teacher as training runs a live one (--amp bf16; CPU autocast shows it here): each row
    equals the live bf16 target of the same batch, stored in float16; float32 stays the CPU default."""
    dataset = crops(data)
    teacher = load_teacher(weights)
    rows = {}
    for amp in (torch.bfloat16, None):
        out = str(tmp_path / f"{amp}.npy")
        build_cache(teacher, dataset, out, MANIFEST, batch_size=4, num_workers=0, dist_info=DistInfo(), amp=amp)
        rows[amp] = CachedTeacher(out, dataset_fingerprint(dataset)).targets(None, torch.arange(N_IMAGES))
        assert json.loads(open(manifest_path(out)).read())["preprocessing"]["autocast"] == str(amp or "float32")
    x = torch.stack([dataset[i][0] for i in range(N_IMAGES)]).float() / 255
    for amp in (torch.bfloat16, None):
        with torch.inference_mode(), autocast(torch.device("cpu"), amp):  # the training step's context
            live = torch.cat([teacher.targets(x[s : s + 4], None) for s in range(0, N_IMAGES, 4)])  # the same batches
        assert live.dtype == torch.float32  # the teacher's contract, whatever its autocast
        assert torch.equal(rows[amp], live.to(torch.float16).float())
    assert not torch.equal(rows[torch.bfloat16], rows[None])


def test_interrupted_build_resumes_with_only_the_missing_rows(data, weights, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "FLUSH_SECONDS", -1.0)  # flush after every batch
    dataset, teacher = crops(data), load_teacher(weights)
    out = str(tmp_path / "feats.npy")
    kwargs = {"batch_size": 2, "num_workers": 0, "dist_info": DistInfo()}
    with pytest.raises(KeyboardInterrupt):
        build_cache(Counting(teacher, fail_after=3), dataset, out, MANIFEST, **kwargs)
    assert not os.path.exists(out) and np.load(out + ".done.npy").sum() == 6
    with pytest.raises(UserError, match="interrupted: rerun the same build command"):
        CachedTeacher(out)
    second = Counting(teacher)
    build_cache(second, dataset, out, MANIFEST, **kwargs)
    assert (second.calls, second.images) == (3, 5)  # exactly the 5 missing rows, in batches of 2
    live = live_features(weights, dataset)
    np.testing.assert_allclose(np.load(out).astype(np.float32), live, rtol=2e-3, atol=2e-3 * np.abs(live).max())
    again = Counting(teacher)
    build_cache(again, dataset, out, MANIFEST, **kwargs)  # complete for these settings: nothing to do
    assert again.images == 0
    other = {**MANIFEST, "preprocessing": {"resize_size": 40, "crop_size": 32}}
    with pytest.raises(UserError, match="built with other settings"):
        build_cache(teacher, dataset, out, other, **kwargs)


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """A finished cache with known rows: row i = [i, i + 0.5, ...] (built by a fake teacher)."""

    class Rows(torch.nn.Module):
        feat_dim = 4

        def forward(self, x):  # the image's mean pixel identifies nothing; use a lookup by content
            return torch.stack([lookup[tuple(img.flatten()[:8].tolist())] for img in x])

    dataset = crops(data)
    lookup = {}
    for i in range(len(dataset)):
        img = dataset[i][0].float() / 255
        lookup[tuple(img.flatten()[:8].tolist())] = torch.tensor([i, i + 0.5, -i, 2.0 * i])
    out = str(tmp_path_factory.mktemp("cache") / "rows.npy")
    build_cache(Rows(), dataset, out, MANIFEST, batch_size=3, num_workers=0, dist_info=DistInfo())
    return out


def test_cached_teacher_gathers_rows_by_index(cache, data):
    expected = np.array([[i, i + 0.5, -i, 2.0 * i] for i in range(N_IMAGES)], dtype=np.float32)
    index = torch.tensor([7, 0, 7, 10, 3])
    for on_device in (False, True):
        teacher = CachedTeacher(cache, dataset_fingerprint(crops(data)), "cpu", on_device=on_device)
        out = teacher.targets(torch.zeros(5, 3, 32, 32), index)
        assert out.dtype == torch.float32 and teacher.feat_dim == 4 and (teacher.table is not None) == on_device
        np.testing.assert_array_equal(out.numpy(), expected[index.numpy()])


def test_rows_read_ahead_in_the_prefetch_thread_are_the_rows_the_step_takes(cache, data, monkeypatch):
    """The mapped file is read by the prefetch thread one batch ahead; targets() takes those rows, no second read."""
    from data.prefetch import DevicePrefetcher

    expected = np.array([[i, i + 0.5, -i, 2.0 * i] for i in range(N_IMAGES)], dtype=np.float32)
    teacher = CachedTeacher(cache, dataset_fingerprint(crops(data)), "cpu")
    readers = []
    read = teacher.read
    monkeypatch.setattr(teacher, "read", lambda idx: readers.append(threading.current_thread().name) or read(idx))
    image = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    batches = [(image, torch.zeros(2), torch.tensor([b, 10 - b])) for b in range(4)]
    for _, _, index in DevicePrefetcher(batches, "cpu", teacher.read_ahead):
        np.testing.assert_array_equal(teacher.targets(None, index).numpy(), expected[index.numpy()])
    assert readers == ["prefetch"] * 4  # every read in the thread, none at the step
    other = torch.tensor([1, 2])  # an index never read ahead: read at the step
    np.testing.assert_array_equal(teacher.targets(None, other).numpy(), expected[[1, 2]])
    assert readers[-1] == threading.current_thread().name and not teacher._ahead


def test_cache_for_another_image_set_is_refused(cache, data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data, other)
    os.remove(other / "train" / "ant" / "img00.png")
    with pytest.raises(UserError, match="another image set: it holds 11 images, the training set has 10"):
        CachedTeacher(cache, dataset_fingerprint(crops(other)))
    os.rename(other / "train" / "ant" / "img03.png", other / "train" / "ant" / "img00.png")
    shutil.copy(other / "train" / "bee" / "img01.png", other / "train" / "bee" / "img99.png")
    with pytest.raises(UserError, match="its image files differ"):
        CachedTeacher(cache, dataset_fingerprint(crops(other)))
    os.rename(other / "train" / "cat", other / "train" / "cow")
    with pytest.raises(UserError, match=r"its class list differs \(e.g. \['cat', 'cow'\]\)"):
        CachedTeacher(cache, dataset_fingerprint(crops(other)))


def test_cache_must_agree_with_the_teacher_flags(cache, data, weights, caplog):
    dataset, cpu = dataset_fingerprint(crops(data)), torch.device("cpu")
    with pytest.raises(UserError, match="built with teacher resnet18, but --arch_teacher is resnet50"):
        open_cached_teacher(cache, dataset, cpu, teacher={"arch": "sup_resnet50"})
    with pytest.raises(UserError, match="holds pooled features; match --teacher_fc"):
        open_cached_teacher(cache, dataset, cpu, teacher={"use_fc": True})
    with pytest.raises(UserError, match="built from other weights than --teacher_weights"):
        open_cached_teacher(cache, dataset, cpu, teacher={"weights": weights})
    with caplog.at_level(logging.WARNING):
        open_cached_teacher(cache, dataset, cpu, image_size=224, teacher={"arch": "resnet18"})
    assert "--image_size 224 differs from the cache's 32 px centre crops" in caplog.text
    os.rename(manifest_path(cache), manifest_path(cache) + ".bak")
    try:
        with pytest.raises(UserError, match="has no manifest"):
            CachedTeacher(cache)
    finally:
        os.rename(manifest_path(cache) + ".bak", manifest_path(cache))


@pytest.mark.slow
def test_train_student_with_the_cache_and_live(cache, data, weights, tmp_path):
    sys.path.insert(0, REPO)
    import train_student

    def run(*extra: str) -> dict:
        flags = [str(data), "--arch_student", "resnet18", "--n_mlp_layers", "2", "--image_size", "32"]
        flags += ["--single_aug", "--weak_weak", "--epochs", "1", "--batch_size", "4", "--num_workers", "0"]
        flags += ["--device", "cpu", "--print_freq", "1", *extra]
        return train_student.main(train_student.get_args_parser().parse_args(flags))

    with pytest.raises(UserError, match="--use_cache and --teacher_feats FILE.npy go together"):
        run("--teacher_feats", cache, "--exp_dir", str(tmp_path / "bad"))
    # One step of the whole set at learning rate 0: the checkpoint holds the weights the loss was computed with.
    whole = ("--batch_size", str(N_IMAGES), "--learning_rate", "0")
    stats = run("--use_cache", "--teacher_feats", cache, *whole, "--exp_dir", str(tmp_path / "cached"))
    assert stats["epoch"] == 1 and stats["steps"] == 1
    assert os.path.exists(tmp_path / "cached" / "checkpoints" / "student_backbone.pth")
    assert stats["loss"] == pytest.approx(recomputed_loss(tmp_path / "cached", data, np.load(cache)), rel=1e-5)
    stats = run("--teacher_weights", weights, "--teacher_fc", "--exp_dir", str(tmp_path / "live"))  # 1000 logits
    assert stats["steps"] == N_IMAGES // 4
    head = safe_load(str(tmp_path / "live" / "checkpoints" / "checkpoint_latest.pth"))["head"]
    assert head["3.weight"].shape == (1000, 1024)  # the student regresses the teacher's fc outputs


def recomputed_loss(exp, data, rows: np.ndarray) -> float:
    """The SimReg loss of a run's saved student (train mode: batch statistics) on every image's epoch-1 crop
    against the cache's rows: what a one-step epoch over the whole set must have logged."""
    from data.transforms import TrainViews
    from models.simreg import Student, regression_loss

    ckpt = safe_load(str(exp / "checkpoints" / "checkpoint_latest.pth"))
    student = Student("resnet18", rows.shape[1], 2)
    student.encoder.backbone.load_state_dict(ckpt["student"])
    student.head.load_state_dict(ckpt["head"])
    dataset = IndexedImageFolder(str(data / "train"), TrainViews(32, True, True, False), seed=0)
    x = torch.stack([dataset[(i, 1)][0] for i in range(len(dataset))]).float() / 255  # (N, 3, 32, 32)
    with torch.no_grad():
        return float(regression_loss(student.train()(x), torch.from_numpy(rows).float()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_reach_the_gpu_through_pinned_memory_ahead_of_the_step(cache, data):
    """On CUDA: the mapped rows gathered into pinned memory in the prefetch thread, copied on its side stream,
    handed to the training stream; the same rows as on the CPU, from the file and from a device table."""
    from data.prefetch import DevicePrefetcher

    dev = torch.device("cuda")
    expected = np.array([[i, i + 0.5, -i, 2.0 * i] for i in range(N_IMAGES)], dtype=np.float32)
    image = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).pin_memory()
    batches = [(image, torch.zeros(2), torch.tensor([b, 10 - b]).pin_memory()) for b in range(5)]
    for on_device in (False, True):
        teacher = CachedTeacher(cache, dataset_fingerprint(crops(data)), dev, on_device=on_device)
        for views, _, index in DevicePrefetcher(batches, dev, teacher.read_ahead):
            rows = teacher.targets(views, index)
            assert rows.device.type == "cuda" and views.device.type == "cuda"
            np.testing.assert_array_equal(rows.cpu().numpy(), expected[index.numpy()])
