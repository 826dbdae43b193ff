"""tools.embed: every image of a folder in any layout, eval_knn.py's features, in the recorded order, resumable."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import eval_knn
from data.image_files import list_image_files
from models.pretrained import EvalModel
from tests.conftest import ROOT
from tests.eval_helpers import make_image_folder
from tests.ship_helpers import write_student_checkpoint
from tools import embed
from tools.engine.cli import run_cli
from tools.eval.features import FeatureStore
from tools.teacher_cache import builder as teacher_cache


@pytest.fixture
def setup(tmp_path) -> tuple[str, str]:
    """(data root with train/ and val/ of 3 classes x 4 and x 2 images, a student checkpoint)."""
    data = make_image_folder(str(tmp_path / "data"), {"train": 4, "val": 2})
    ckpt = str(tmp_path / "ckpt_epoch_3.pth")
    write_student_checkpoint(ckpt)
    return data, ckpt


def run_embed(folder: str, ckpt: str, out: str, *extra: str) -> None:
    argv = [folder, "--weights", ckpt, "--out", out, "--resize_size", "32", "--crop_size", "32", "-j", "0",
            "--device", "cpu", *extra]  # fmt: skip
    embed.main(embed.get_args_parser().parse_args(argv))


def test_every_image_of_any_layout_in_sorted_order(tmp_path):
    for rel in ("b.png", "a/z.JPG", "a/deeper/c.webp", ".hidden/d.png", "a/.e.png", "notes.txt", "a/f.jpeg"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert list_image_files(str(tmp_path)) == ["a/deeper/c.webp", "a/f.jpeg", "a/z.JPG", "b.png"]


def test_embed_features_equal_eval_knn_features_in_the_recorded_order(setup, tmp_path):
    data, ckpt = setup
    argv = [data, "--weights", ckpt, "--save", str(tmp_path / "knn"), "-b", "64", "-j", "0", "--device", "cpu",
            "--resize_size", "32", "--crop_size", "32", "-k", "1"]  # fmt: skip
    eval_knn.main(eval_knn.get_args_parser().parse_args(argv))
    knn_feats, _ = FeatureStore(str(tmp_path / "knn")).load("train")  # float16, ImageFolder order
    knn_files = [p for p, _ in eval_knn_dataset_samples(data)]

    out = str(tmp_path / "emb" / "feats.npy")
    run_embed(os.path.join(data, "train"), ckpt, out, "-b", "64")
    feats, record = np.load(out), json.load(open(out[:-4] + ".json"))
    assert feats.dtype == np.float16 and feats.shape == (12, 512)
    assert sorted(record["files"]) == sorted(knn_files) and len(record["files"]) == 12
    for row, rel in enumerate(record["files"]):  # the JSON's order is the array's
        assert np.array_equal(feats[row], knn_feats[knn_files.index(rel)].numpy()), rel
    assert record["teacher"]["kind"] == "student" and record["preprocessing"]["crop_size"] == 32


def eval_knn_dataset_samples(data: str) -> list:
    from tools.eval.features import build_eval_dataset

    return [(p.replace(os.sep, "/"), y) for p, y in build_eval_dataset(data, "train", 32, 32).samples]


def test_an_interrupted_embed_computes_only_the_missing_rows(setup, tmp_path, monkeypatch):
    data, ckpt = setup
    folder = os.path.join(data, "train")
    straight = str(tmp_path / "straight.npy")
    run_embed(folder, ckpt, straight, "-b", "4")

    monkeypatch.setattr(teacher_cache, "FLUSH_SECONDS", 0.0)  # rows reach the disk after every batch
    forward, seen = EvalModel.forward, []

    def counting(self, x, fail_at=None):
        seen.append(x.shape[0])
        if fail_at is not None and len(seen) == fail_at:
            raise RuntimeError("interrupted")
        return forward(self, x)

    out = str(tmp_path / "resumed.npy")
    monkeypatch.setattr(EvalModel, "forward", lambda self, x: counting(self, x, fail_at=2))
    with pytest.raises(RuntimeError, match="interrupted"):
        run_embed(folder, ckpt, out, "-b", "4")  # dies in its second batch of four
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    seen.clear()
    monkeypatch.setattr(EvalModel, "forward", lambda self, x: counting(self, x))
    run_embed(folder, ckpt, out, "-b", "4")
    assert seen == [4, 4]  # 12 images, 4 done before the interruption: only the 8 missing rows
    assert np.array_equal(np.load(out), np.load(straight))
    assert json.load(open(out[:-4] + ".json"))["files"] == json.load(open(straight[:-4] + ".json"))["files"]
    assert not os.path.exists(out + ".partial")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_under_torchrun_write_the_same_rows(setup, tmp_path):
    data, ckpt = setup
    folder = os.path.join(data, "train")
    one = str(tmp_path / "one.npy")
    run_embed(folder, ckpt, one, "-b", "3")
    two = str(tmp_path / "two.npy")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tools.embed",
           folder, "--weights", ckpt, "--out", two, "--resize_size", "32", "--crop_size", "32", "-j", "0",
           "--device", "cpu", "-b", "3"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # Rank r of step s takes images [6s + 3r, 6s + 3r + 3): the single process's batches, so the same rows.
    assert np.array_equal(np.load(two), np.load(one))
    assert json.load(open(two[:-4] + ".json"))["world_size"] == 2


def test_an_unreadable_image_is_named_in_one_sentence(setup, tmp_path, caplog):
    data, ckpt = setup
    bad = os.path.join(data, "train", "c1", "002.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    argv = [os.path.join(data, "train"), "--weights", ckpt, "--out", str(tmp_path / "f.npy"), "-j", "0",
            "--device", "cpu", "--resize_size", "32", "--crop_size", "32"]  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(embed.main, embed.get_args_parser().parse_args(argv))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1 and f"cannot read image '{bad}'" in errors[0], errors
