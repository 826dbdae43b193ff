"""The three forms of DATA: class folders (unchanged), any folder of images (no labels), WebDataset shards.

The same images as a folder and as shards are the same dataset: same fingerprint, same crops and the same
training run bit for bit; the index is numpy arrays that forked workers share; every mistake is one sentence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import torchvision
import webdataset as wds
from PIL import Image

import train_student
from data.datasets import dataset_fingerprint, scan_class_folders
from data.index import SampleIndex
from data.loaders import EpochSampler, build_loader
from data.shards import index_path
from data.sources import open_images
from data.transforms import TrainViews
from tests.conftest import ROOT, write_random_resnet18
from tests.test_guarantees import assert_same_weights, final_state
from tools import cache_teacher_features, embed, make_shards
from tools.bench.scale import tuple_index_scan
from tools.engine.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest
SIZE = 32


def write_pictures(folder, names, seed: int = 0) -> None:
    """Smooth random pictures (different crops differ) at ``folder/<name>``: JPEG, PNG or WebP by the name."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
        coarse.resize((48 + 4 * (i % 3), 40 + 2 * (i % 4)), Image.BICUBIC).save(path, quality=92)


CLASS_FILES = [f"{('ant', 'bee')[i % 2]}/img{i:02d}.{'png' if i % 5 == 0 else 'jpg'}" for i in range(12)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A dataset root: train/ with 2 class folders of 6 JPEG and PNG pictures each."""
    root = tmp_path_factory.mktemp("forms") / "data"
    write_pictures(str(root / "train"), CLASS_FILES)
    return str(root)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> str:
    """The same images as 3 shards of 5, 5 and 2 (tools.make_shards)."""
    out = str(tmp_path_factory.mktemp("shards"))
    return make_shards.main(make_shards.get_args_parser().parse_args([folder, out, "--shard_size", "5"]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return write_random_resnet18(tmp_path_factory.mktemp("teacher") / "r18.pth")


def train_args(data, weights, exp, epochs=2, *extra):
    argv = [data, "--teacher_weights", weights, "--arch_student", "resnet18", "--image_size", str(SIZE),
            "--batch_size", "4", "--epochs", str(epochs), "--num_workers", "0", "--device", "cpu",
            "--single_aug", "--weak_weak", "--exp_dir", str(exp), "--print_freq", "1", *extra]  # fmt: skip
    return train_student.get_args_parser().parse_args(argv)


def losses(exp) -> list[float]:
    with open(os.path.join(exp, "logs", "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ============ class folders: today's meaning and numbers ============
def test_class_folder_index_is_the_list_of_tuples_index(tmp_path):
    """Nested folders, hidden files, symbolic links, a folder named like an image, non-ASCII names, a class subset."""
    names = ["a/1.png", "a/b.png", "a/b/2.JPG", "a/b/c/3.jpeg", "a/.hid.png", "a/.hdir/4.png", "a/x.txt",
             "b/é.png", "b/Z.PNG", "b/z.png", "b.dir/5.gif", "c/sub/6.webp", "c/sub.png", "c/sub-1.png",
             "d/dir.jpg/9.png"]  # fmt: skip
    for name in names:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    os.symlink(tmp_path / "c" / "sub", tmp_path / "a" / "link")
    for classes in (None, ["c", "a"]):
        want_classes, want = tuple_index_scan(str(tmp_path), classes)
        index = scan_class_folders(str(tmp_path), classes)
        assert list(index) == want and index.classes == want_classes
        sha = hashlib.sha256("\n".join(p for p, _ in want).encode()).hexdigest()
        assert index.fingerprint() == {"n_images": len(want), "classes": want_classes, "paths_sha256": sha}
    every = list(scan_class_folders(str(tmp_path)))  # the link followed, the folder named .jpg walked
    assert {("a/link/6.webp", 0), ("a/.hid.png", 0), ("d/dir.jpg/9.png", 4)} <= set(every) and len(every) == 15


def test_index_round_trips_any_name_and_concatenates():
    names = ["x/é.jpg", "plain.png", "bad\udcff.jpg", ""]
    index = SampleIndex.from_names(names, [3, -1, 0, 7], ["a"])
    assert index.names() == names and [index.name(i) for i in range(4)] == names
    assert index.labels.dtype == np.int32 and index.starts.dtype == np.uint32
    both = SampleIndex.concat([index, SampleIndex.from_names(["z.jpg"])], ["a"])
    assert list(both) == [*zip(names, [3, -1, 0, 7], strict=True), ("z.jpg", -1)]
    assert both.name_sample(2) == ["x/é.jpg", "z.jpg"]


def test_the_sampler_keeps_its_order(tmp_path):
    """The numpy sampler yields what the list-based one did: permutation, wrap-around, rank slices, start."""
    for n, world in ((7, 3), (20, 2), (5, 8)):
        for rank in range(world):
            sampler = EpochSampler(n, rank, world, seed=3)
            sampler.set_epoch(2, start=1)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100_003 + 2)).tolist()
            total = -(-n // world) * world
            order += (order * (total // n + 1))[: total - n]
            assert list(sampler) == [(i, 2) for i in order[rank:total:world][1:]]


def test_forked_workers_share_the_index_pages(tmp_path):
    """A process forked after the index is built reads every name; its private memory grows by far less than
    the index, while reading a list of (path, label) tuples copies most of it."""
    names = [f"n{i // 1000:08d}/n{i // 1000:08d}_{i}.JPEG" for i in range(500_000)]
    index = SampleIndex.from_names(names, np.arange(len(names)) // 1000, ["c"])
    tuples = [(n, i // 1000) for i, n in enumerate(names)]
    del names

    def read_ours() -> None:
        for i in range(len(index)):
            index.name(i), index.label(i)

    def read_theirs() -> None:
        for i in range(len(tuples)):
            tuples[i][0], tuples[i][1]

    ours, theirs = _private_growth(read_ours), _private_growth(read_theirs)
    assert ours < 0.1 * index.nbytes, (ours, index.nbytes)
    assert theirs > 0.5 * index.nbytes, (theirs, index.nbytes)


def _private_growth(read) -> int:
    """Bytes of private memory a forked child gains while running ``read()``."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("needs Linux's /proc/PID/smaps_rollup")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, read, measure, report
        before = _private_bytes()
        read()
        os.write(w, str(_private_bytes() - before).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        grown = int(f.read())
    os.waitpid(pid, 0)
    return grown


def _private_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("Private_Dirty", "Private_Clean")))


# ============ a folder of images without labels ============
def test_a_folder_of_images_trains_resumes_and_says_the_monitor_is_off(tmp_path, weights, caplog):
    photos = tmp_path / "photos"
    write_pictures(str(photos), [f"p{i}.jpg" for i in range(5)] + ["deeper/q.png", "deeper/more/r.webp", "s.JPG"])
    straight, split = tmp_path / "straight", tmp_path / "split"
    every = ("--layout", "images")  # images beside sub-folders: every one of them, no labels
    with caplog.at_level(logging.INFO):
        train_student.main(train_args(str(photos), weights, straight, 2, "--knn_every", "1", *every))
    assert "data: 8 images (no labels) under" in caplog.text
    assert "k-NN monitor is off: DATA holds images without labels" in caplog.text
    train_student.main(train_args(str(photos), weights, split, 1, *every))
    train_student.main(train_args(str(photos), weights, split, 2, *every))
    assert_same_weights(final_state(str(straight)), final_state(str(split)))
    dataset = open_images(str(photos), layout="images")
    assert dataset.classes == [] and dataset.index.names()[:2] == ["deeper/more/r.webp", "deeper/q.png"]
    assert dataset_fingerprint(dataset)["n_images"] == 8 and set(dataset.targets) == {-1}


def test_a_folder_of_images_has_its_teacher_caches(tmp_path, weights):
    photos = tmp_path / "photos"
    write_pictures(str(photos), [f"p{i}.jpg" for i in range(6)] + ["deeper/q.png", "deeper/r.jpg"])
    fingerprint = dataset_fingerprint(open_images(str(photos), layout="images"))
    for views, shape in ((0, (8, 512)), (2, (2, 8, 512))):
        out = str(tmp_path / f"views{views}.npy")
        argv = [str(photos), "--layout", "images", "--teacher_weights", weights, "--out", out, "--batch_size",
                "5", "--num_workers", "0", "--device", "cpu", "--single_aug", "--weak_weak", "--image_size",
                str(SIZE)]  # fmt: skip
        argv += ["--views", str(views)] if views else ["--resize_size", "36", "--crop_size", str(SIZE)]
        cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))
        with open(out[:-4] + ".json") as f:
            manifest = json.load(f)
        assert np.load(out).shape == shape and manifest["classes"] == [] and manifest["n_images"] == 8
        assert manifest["paths_sha256"] == fingerprint["paths_sha256"]
    cached = ("--layout", "images", "--use_cache", "--teacher_feats", str(tmp_path / "views2.npy"))
    stats = train_student.main(train_args(str(photos), weights, tmp_path / "e", 2, *cached))
    assert stats["epoch"] == 2 and np.isfinite(stats["loss"])


def test_layout_auto_reads_sub_folders_as_classes_and_names_loose_images(tmp_path, caplog):
    write_pictures(str(tmp_path / "flat"), ["a.jpg", "b.png"])
    assert open_images(str(tmp_path / "flat")).index.names() == ["a.jpg", "b.png"]  # no sub-folder: no labels
    write_pictures(str(tmp_path / "mixed" / "train"), ["x/1.jpg", "y/2.jpg", "loose.jpg"])
    with caplog.at_level(logging.WARNING):
        mixed = open_images(str(tmp_path / "mixed"))
    assert list(mixed.samples) == [("x/1.jpg", 0), ("y/2.jpg", 1)] and mixed.classes == ["x", "y"]
    assert "1 image(s) directly in" in caplog.text and "--layout images" in caplog.text


def test_val_data_runs_the_monitor_for_unlabelled_training(tmp_path, weights):
    flat = tmp_path / "photos"
    write_pictures(str(flat), [f"p{i}.jpg" for i in range(4)])
    write_pictures(str(tmp_path / "labelled" / "train"), CLASS_FILES[:6], seed=1)
    write_pictures(str(tmp_path / "labelled" / "val"), CLASS_FILES[6:], seed=2)
    extra = ("--knn_every", "1", "--val_data", str(tmp_path / "labelled"), "--knn_resize_size", "36")
    stats = train_student.main(train_args(str(flat), weights, tmp_path / "e", 1, *extra))
    assert {"knn_top1_k1", "knn_weighted_top1_k1"} <= set(stats)


# ============ shards ============
def test_shards_hold_the_folders_samples_in_order_and_webdataset_reads_them(folder, shards):
    a, b = open_images(folder), open_images(shards)
    assert list(a.samples) == list(b.samples) and a.classes == b.classes == ["ant", "bee"]
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    read = list(wds.WebDataset(shards, shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"{i:09d}" for i in range(12)]
    for i, sample in enumerate(read):
        name = a.index.name(i)
        with open(os.path.join(a.root, name), "rb") as f:
            assert sample[name.rsplit(".", 1)[1]] == f.read()
        assert sample["path"].decode() == name and int(sample["cls"]) == a.index.label(i)


def test_folder_and_shards_give_the_same_crops_bit_for_bit(folder, shards):
    for decode in ("auto", "pil"):
        for single, weak_weak in ((True, True), (False, False)):
            views = TrainViews(SIZE, single, weak_weak, False, decode=decode)
            a, b = open_images(folder, views, seed=5), open_images(shards, views, seed=5)
            for key in [(i, e) for i in range(len(a)) for e in (1, 2)]:
                x, y = a[key], b[key]
                assert x[1:] == y[1:]
                pairs = [(x[0], y[0])] if single else list(zip(x[0], y[0], strict=True))
                assert all(torch.equal(u, v) for u, v in pairs), (key, decode, single)


def test_device_decoding_of_shards_gives_the_folders_crops(folder, shards):
    """--decode gpu: workers hand over the encoded JPEG bytes and boxes; decoded here on the CPU."""
    views = TrainViews(SIZE, True, True, False, decode="gpu")
    a, b = open_images(folder, views, seed=5), open_images(shards, views, seed=5)
    keys = [(i, 2) for i in range(len(a))]
    batch_a, labels_a, index_a = views.collate([a[k] for k in keys])
    batch_b, labels_b, index_b = views.collate([b[k] for k in keys])
    assert batch_a.lengths and batch_a.boxes == batch_b.boxes and batch_a.flips == batch_b.flips
    assert torch.equal(labels_a, labels_b) and torch.equal(index_a, index_b)
    assert torch.equal(batch_a.decode("cpu"), batch_b.decode("cpu"))


def test_training_on_shards_equals_training_on_the_folder_and_resumes_across_them(folder, shards, weights, tmp_path):
    on_folder, on_shards, mixed = tmp_path / "folder", tmp_path / "shards", tmp_path / "mixed"
    train_student.main(train_args(folder, weights, on_folder, 2))
    train_student.main(train_args(shards, weights, on_shards, 2, "--num_workers", "2"))
    assert losses(on_folder) == losses(on_shards)
    assert_same_weights(final_state(str(on_folder)), final_state(str(on_shards)))
    train_student.main(train_args(folder, weights, mixed, 1))  # the same run: a folder's checkpoint resumes on shards
    train_student.main(train_args(shards, weights, mixed, 2))
    assert_same_weights(final_state(str(on_folder)), final_state(str(mixed)))


def test_two_ranks_of_shards_load_the_one_process_batches(shards):
    views = TrainViews(SIZE, True, True, False)
    dataset = open_images(shards, views, seed=0)
    one = build_loader(dataset, 4, num_workers=0, seed=1)
    ranks = [build_loader(dataset, 2, num_workers=0, rank=r, world_size=2, seed=1) for r in range(2)]
    for loader in (one, *ranks):
        loader.sampler.set_epoch(3)
    for (x, _, i), (x0, _, i0), (x1, _, i1) in zip(one, *ranks, strict=True):
        assert sorted(i.tolist()) == sorted(i0.tolist() + i1.tolist())
        mine = dict(zip(i.tolist(), x, strict=True))
        assert all(torch.equal(mine[int(j)], y) for j, y in zip(torch.cat([i0, i1]), torch.cat([x0, x1]), strict=True))


@pytest.mark.parametrize("views", [0, 2])
def test_teacher_caches_of_shards_equal_those_of_the_folder(folder, shards, weights, tmp_path, views):
    rows = {}
    for name, data in (("folder", folder), ("shards", shards)):
        out = str(tmp_path / f"{name}.npy")
        argv = [data, "--teacher_weights", weights, "--out", out, "--batch_size", "5", "--num_workers", "0",
                "--device", "cpu", "--single_aug", "--weak_weak", "--image_size", str(SIZE)]  # fmt: skip
        argv += ["--views", str(views)] if views else ["--resize_size", "36", "--crop_size", str(SIZE)]
        cache_teacher_features.main(cache_teacher_features.get_args_parser().parse_args(argv))
        with open(out[:-4] + ".json") as f:
            rows[name] = np.load(out), {k: v for k, v in json.load(f).items() if k in ("paths_sha256", "views")}
    assert np.array_equal(rows["folder"][0], rows["shards"][0]) and rows["folder"][1] == rows["shards"][1]
    if views:  # and training reads the shards' cache with the folder's
        train_student.main(train_args(folder, weights, tmp_path / "e", 2, "--use_cache", "--teacher_feats",
                                      str(tmp_path / "shards.npy")))  # fmt: skip


def test_embed_of_shards_equals_embed_of_the_folder(folder, shards, weights, tmp_path):
    feats = {}
    for name, data in (("folder", os.path.join(folder, "train")), ("shards", shards)):
        out = str(tmp_path / f"{name}.npy")
        argv = [data, "--weights", weights, "--teacher", "--out", out, "--resize_size", "36", "--crop_size", "32",
                "-j", "0", "--device", "cpu"]  # fmt: skip
        embed.main(embed.get_args_parser().parse_args(argv))
        with open(out[:-4] + ".json") as f:
            feats[name] = dict(zip(json.load(f)["files"], np.load(out), strict=True))
    assert feats["folder"].keys() == feats["shards"].keys() and len(feats["folder"]) == 12
    assert all(np.array_equal(feats["folder"][k], feats["shards"][k]) for k in feats["folder"])


def test_make_shards_is_deterministic_and_resumes(folder, shards, tmp_path):
    spec = make_shards.main(make_shards.get_args_parser().parse_args([folder, str(tmp_path), "--shard_size", "5"]))
    mine = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar"))
    theirs = os.path.dirname(shards)
    for name in mine:
        assert open(tmp_path / name, "rb").read() == open(os.path.join(theirs, name), "rb").read()
    os.remove(tmp_path / mine[1])
    stamp = os.path.getmtime(tmp_path / mine[0])
    again = make_shards.main(make_shards.get_args_parser().parse_args([folder, str(tmp_path), "--shard_size", "5"]))
    assert again == spec
    assert os.path.getmtime(tmp_path / mine[0]) == stamp and os.path.isfile(tmp_path / mine[1])


def test_shards_of_another_tool_are_indexed_and_read(tmp_path, folder, weights):
    """webdataset's own writer, keys with folders in them, a sample without an image (left out)."""
    dataset = open_images(folder)
    with wds.TarWriter(str(tmp_path / "web-0.tar")) as sink:
        for i in range(len(dataset)):
            with open(os.path.join(dataset.root, dataset.index.name(i)), "rb") as f:
                sink.write({"__key__": f"part/{i:04d}", "jpg": f.read(), "cls": str(i % 2).encode()})
        sink.write({"__key__": "part/caption_only", "txt": b"no image"})
    spec = str(tmp_path / "web-{0..0}.tar")
    make_shards.main(make_shards.get_args_parser().parse_args(["--index", spec]))
    shard = open_images(spec)
    assert shard.index.names() == [f"part/{i:04d}" for i in range(12)] and shard.classes == []
    assert shard.targets.tolist() == [i % 2 for i in range(12)]
    views = TrainViews(SIZE, True, True, False)
    assert torch.equal(open_images(spec, views)[(3, 1)][0], open_images(folder, views)[(3, 1)][0])


# ============ every mistake in one sentence, through the command ============
def _corrupt_shard(tmp_path, shards) -> str:
    root = tmp_path / "bad"
    shutil.copytree(os.path.dirname(shards), root)
    tar = str(root / "train-000001.tar")
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    with open(tar, "r+b") as f:  # the JPEG's bytes zeroed, its size and the index untouched
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    return str(root / "train-{000000..000002}.tar")


MISTAKES = {
    "empty folder": (lambda t, s: str(t / "empty"), r"empty' holds no images \(.jpg"),
    "no images": (lambda t, s: str(t / "texts"), r"texts' holds no images \(.jpg"),
    "no shard": (
        lambda t, s: str(t / "nope-{000..003}.tar"),
        r"no shard matches '.*nope-\{000..003\}.tar': '.*nope-000",
    ),
    "some shards": (
        lambda t, s: s.replace("000002}", "000004}"),
        r"shard '.*train-000003.tar' of .* does not exist \(3 of 5",
    ),
    "no index": (lambda t, s: str(t / "lone.tar"), r"shard '.*lone.tar' has no index .*make_shards --index"),
    "stale index": (lambda t, s: str(t / "grown.tar"), r"changed since it was indexed .*make_shards --index"),
    "bad image": (_corrupt_shard, r"cannot read image '.*' in shard '.*train-000001.tar' .*--skip_bad_images"),
    "compressed": (lambda t, s: str(t / "x-{0..3}.tar.gz"), r"compressed tar files; shards are read by index"),
    "class list": (lambda t, s: s, r"--dataset imagenet100 choose class folders; shards are used whole"),
    "val_data": (lambda t, s: s, r"--val_data folder '.*nowhere' does not exist"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_data_mistake_is_one_sentence(case, tmp_path, shards, weights, caplog):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    with tarfile.open(tmp_path / "lone.tar", "w") as t:
        t.add(__file__, arcname="0.jpg")
    first = os.path.join(os.path.dirname(shards), "train-000000.tar")
    shutil.copy(first, tmp_path / "grown.tar")
    shutil.copy(index_path(first), index_path(str(tmp_path / "grown.tar")))
    with open(tmp_path / "grown.tar", "ab") as f:
        f.write(b"\0" * 512)
    make_data, message = MISTAKES[case]
    extra = {"class list": ["--dataset", "imagenet100"], "val_data": ["--knn_every", "1", "--val_data",
             str(tmp_path / "nowhere")], "bad image": ["--num_workers", "2"]}.get(case, [])  # fmt: skip
    args = train_args(make_data(tmp_path, shards), weights, tmp_path / "e", 1, *extra)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_student.main, args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    assert re.search(message, errors[0]), errors[0]


def test_skip_bad_images_skips_an_unreadable_sample_of_a_shard(tmp_path, shards, weights):
    stats = train_student.main(train_args(_corrupt_shard(tmp_path, shards), weights, tmp_path / "e", 1,
                                          "--skip_bad_images"))  # fmt: skip
    assert stats["bad_images_skipped"] == 1 and stats["steps"] == 3


SHARD_MISTAKES = {
    "no folder": (lambda t, s: [str(t / "nope"), str(t / "out")], r"data folder '.*nope' does not exist"),
    "out is a file": (lambda t, s: [str(t), __file__], r"OUT '.*' is a file"),
    "shards as folder": (lambda t, s: [s, str(t / "out")], r"names shards already; give the folder of images"),
    "index and folder": (lambda t, s: [str(t), "--index", s], r"--index SHARDS indexes existing shards; give no"),
    "index of nothing": (lambda t, s: ["--index", str(t / "x-{0..2}.tar")], r"no shard matches"),
    "nothing": (lambda t, s: [], r"give FOLDER and OUT"),
}


@pytest.mark.parametrize("case", sorted(SHARD_MISTAKES))
def test_make_shards_mistakes_are_one_sentence(case, tmp_path, shards, caplog):
    make_argv, message = SHARD_MISTAKES[case]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(make_shards.main, make_shards.get_args_parser().parse_args(make_argv(tmp_path, shards)))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1 and re.search(message, errors[0]), errors


def test_embed_names_an_unreadable_sample_and_its_shard(tmp_path, shards, weights, caplog):
    argv = [_corrupt_shard(tmp_path, shards), "--weights", weights, "--teacher", "--out", str(tmp_path / "f.npy"),
            "--resize_size", "36", "--crop_size", "32", "-j", "0", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(embed.main, embed.get_args_parser().parse_args(argv))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert re.search(r"cannot read image '.*' in shard '.*train-000001.tar' \(not an image format PIL knows\); "
                     r"re-create that shard \(python -m tools.make_shards\)$", errors[0]), errors  # fmt: skip


@pytest.mark.slow
def test_a_killed_run_on_shards_resumes_mid_epoch_exactly(shards, weights, tmp_path):
    from tests.test_guarantees import TRAIN, run_until

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    argv = [shards, "--teacher_weights", weights, "--arch_student", "resnet18", "--image_size", str(SIZE),
            "--batch_size", "4", "--epochs", "2", "--num_workers", "1", "--device", "cpu", "--single_aug",
            "--weak_weak", "--print_freq", "1", "--ckpt_every_steps", "1", "--exp_dir"]  # fmt: skip
    subprocess.run(TRAIN + argv + [straight], cwd=ROOT, check=True, capture_output=True)
    assert run_until(argv + [killed], 2, signal.SIGKILL) == -signal.SIGKILL  # after step 2 of epoch 1's 3
    subprocess.run(TRAIN + argv + [killed], cwd=ROOT, check=True, capture_output=True)
    assert_same_weights(final_state(straight), final_state(killed))


@pytest.mark.slow
def test_two_teachers_on_shards_equal_two_teachers_on_the_folder(folder, shards, weights, tmp_path):
    torch.manual_seed(5)
    other = str(tmp_path / "other.pth")
    torch.save(torchvision.models.resnet18().state_dict(), other)
    for name, data in (("folder", folder), ("shards", shards)):
        args = train_args(data, weights, tmp_path / name, 1)
        args.teacher_weights = [weights, other]
        train_student.main(args)
    assert losses(tmp_path / "folder") == losses(tmp_path / "shards")
    assert_same_weights(final_state(str(tmp_path / "folder")), final_state(str(tmp_path / "shards")))


@pytest.mark.slow
def test_data_scale_profile_measures_each_form_and_cleans_up(tmp_path):
    from tools import benchmark

    argv = [
        "data_scale",
        "--dry_run",
        "--work_dir",
        str(tmp_path),
        "--set",
        "files=300",
        "--json",
        str(tmp_path / "r.json"),
    ]
    rows = benchmark.main(benchmark.get_args_parser().parse_args(argv))
    assert [r["key"] for r in rows] == ["index.folder_tuples_300", "index.folder_ours_300", "index.shards_ours_300"]
    for r in rows:
        assert r["n_images"] == 300 and r["workers"] == 2 and r["first_batch_s"] >= r["build_s"] > 0
        assert r["worker_private_mb"] is not None and r["main_index_mb"] is not None and "load_1min" in r
    assert not os.path.exists(tmp_path / "scale")  # the simulated folders and shards are removed
