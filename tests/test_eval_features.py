"""Ordered feature extraction (1 and 2 gloo ranks) and the feature store's staleness rules."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from data.datasets import dataset_fingerprint
from tests.eval_helpers import make_image_folder
from tools.engine.distributed import DistInfo
from tools.eval.features import FeatureStore, build_eval_dataset, extract_features, features_fit_on_device


class TinyNet(nn.Module):
    """Deterministic (B, 3, H, W) -> (B, 5); different images give different rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3)
        self.feat_dim = 5

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_k_nn_features_stay_on_the_gpu_when_they_fit():
    """ImageNet's 1.28M x 2048 (R50 features: about 42 GB with the search's copies) stay on a 140 GB card, not on a
    40 GB one (then they are gathered in host memory as before); a CPU run keeps them where they are."""
    cuda = torch.device("cuda", 0)
    assert features_fit_on_device(1_281_167, 2048, cuda, free_bytes=140 * 2**30)
    assert not features_fit_on_device(1_281_167, 2048, cuda, free_bytes=40 * 2**30)
    assert features_fit_on_device(1_281_167, 512, cuda, free_bytes=40 * 2**30)
    assert not features_fit_on_device(10, 4, torch.device("cpu"), free_bytes=1 << 40)


def _extract_on_rank(rank: int, world_size: int, init_file: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset = build_eval_dataset(root, "train", 8, 8)
        got = extract_features(TinyNet(), dataset, batch_size=2, num_workers=0, dist_info=DistInfo(rank, world_size))
        assert (got is None) == (rank != 0)
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_extraction_equals_one_rank_row_for_row(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), {"train": 3}, classes=3, size=8)  # 9 images: 2 ranks pad
    dataset = build_eval_dataset(root, "train", 8, 8)
    single, labels = extract_features(TinyNet(), dataset, batch_size=4, num_workers=0, dist_info=DistInfo())
    out = str(tmp_path / "two.pt")
    mp.spawn(_extract_on_rank, args=(2, str(tmp_path / "init"), root, out), nprocs=2, join=True)
    two, two_labels = torch.load(out, weights_only=True)
    assert single.shape == (9, 5)
    assert torch.allclose(two, single, atol=1e-6, rtol=0)
    assert torch.equal(labels, two_labels)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Rows are in dataset order: each equals the network applied to that one image.
    x = torch.stack([dataset[i][0] for i in range(9)]).float() / 255
    assert torch.allclose(single, TinyNet()(x), atol=1e-6)


def test_store_reuses_only_a_matching_key(tmp_path):
    store = FeatureStore(str(tmp_path / "features"))
    key = {"model": {"weights_sha256": "aaa"}, "data": {"n": 3}}
    feats, labels = torch.randn(3, 4), torch.tensor([0, 1, 1])
    assert store.check(key, ("train",))[0] == "absent"
    store.save(key, {"train": (feats, labels)}, {})
    assert store.check(key, ("train",))[0] == "match"
    assert store.check(key, ("train", "val"))[0] == "absent"
    status, reason = store.check({**key, "model": {"weights_sha256": "bbb"}}, ("train",))
    assert status == "stale" and "weights_sha256" in reason
    loaded, loaded_labels = store.load("train")
    assert loaded.dtype == torch.float16 and torch.equal(loaded, feats.half())
    assert torch.equal(loaded_labels, labels)
    # Adding a split under the same key keeps the first one valid.
    store.save(key, {"val": (feats[:2], labels[:2])}, {})
    assert store.check(key, ("train", "val"))[0] == "match"
    assert sorted(os.listdir(store.folder)) == [
        "features_manifest.json",
        "train_feats.npy",
        "train_labels.npy",
        "val_feats.npy",
        "val_labels.npy",
    ]


def test_fingerprint_changes_with_the_image_list(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), {"train": 2}, classes=2, size=8)
    before = dataset_fingerprint(build_eval_dataset(root, "train", 8, 8))
    os.remove(os.path.join(root, "train", "c1", "001.png"))
    after = dataset_fingerprint(build_eval_dataset(root, "train", 8, 8))
    assert before["n_images"] == 4 and after["n_images"] == 3
    assert before["paths_sha256"] != after["paths_sha256"]
    assert before["classes"] == after["classes"] == ["c0", "c1"]
