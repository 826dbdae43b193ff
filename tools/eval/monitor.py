"""The k-NN monitor of ``train_student.py --knn_every N``: the same k-NN as ``eval_knn.py``, during training."""

from __future__ import annotations

import logging
import os

import torch

from data.datasets import IndexedImages, split_folder
from models.errors import UserError
from tools.engine.cli import note_ignored
from tools.engine.distributed import DistInfo
from tools.eval.common import default_resize, eval_datasets
from tools.eval.features import extract_features
from tools.eval.knn import knn_classify

log = logging.getLogger("simreg.train")


def check_monitor_data(val_data: str | None, knn_every: int) -> None:
    """``--val_data``: an existing root with train/ and val/ (the k-NN monitor's bank and queries)."""
    if val_data and not knn_every:
        note_ignored("--val_data", "it names the k-NN monitor's data; add --knn_every N to run the monitor")
    if val_data and knn_every:
        if not os.path.isdir(val_data):
            what = "is a file" if os.path.exists(val_data) else "does not exist"
            raise UserError(f"--val_data folder '{val_data}' {what}; give a root holding train/ and val/ "
                            "in class folders, or drop --val_data")  # fmt: skip
        split_folder(val_data, "train")
        split_folder(val_data, "val")


def monitor_sets(
    data: str, val_data: str | None, knn_every: int, image_size: int, resize_size: int, dataset: IndexedImages
) -> dict | None:
    """The k-NN monitor's centre-crop train/ and val/, as eval_knn.py reads them: ``val_data`` (all its
    classes), else ``data``'s own when its training images are data/train's class folders and it has val/ (the
    training classes); None when the monitor is off (said in the log)."""
    if not knn_every:
        return None
    if val_data:
        return monitor_datasets(val_data, image_size, resize_size, None)
    own = dataset.root == os.path.join(data, "train") and os.path.isdir(os.path.join(data, "val"))
    if dataset.classes and own:
        return monitor_datasets(data, image_size, resize_size, dataset.classes)
    why = "has no val/" if dataset.classes else "holds images without labels"
    log.warning("--knn_every %d: the k-NN monitor is off: DATA %s; pass --val_data DIR (train/ and val/ in class "
                "folders) to run it", knn_every, why)  # fmt: skip
    return None


def monitor_datasets(data: str, image_size: int, resize_size: int, classes: list[str]) -> dict:
    """Centre-crop train/ and val/ at the training crop size (resize 256 for 224 px crops, the same ratio
    otherwise): what eval_knn.py defaults to for this run's checkpoints."""
    resize = resize_size or default_resize(image_size)
    return eval_datasets(data, resize, image_size, classes)


def knn_monitor(
    encoder: torch.nn.Module,
    datasets: dict,
    *,
    batch_size: int,
    workers: int,
    dist_info: DistInfo,
    amp_dtype: torch.dtype | None = None,
    ks: tuple[int, ...] = (1, 20),
) -> dict[str, float]:
    """k-NN top-1 (%) of ``encoder`` on ``datasets["val"]`` against ``datasets["train"]`` (centre crops).

    The training loop's monitor: every rank extracts its share of the features (call it on all
    ranks), rank 0 searches and gets ``{"knn_top1_k<k>": ..., "knn_weighted_top1_k<k>": ...}``;
    the other ranks get ``{}``. The encoder's train/eval mode is restored afterwards.
    """
    kw = dict(batch_size=batch_size, num_workers=workers, dist_info=dist_info, amp_dtype=amp_dtype, on_device=True)
    with torch.random.fork_rng(devices=[]):  # the loaders draw seeds: keep training's RNG stream untouched
        train = extract_features(encoder, datasets["train"], desc="k-NN train", **kw)
        val = extract_features(encoder, datasets["val"], desc="k-NN val", **kw)
    if train is None:
        return {}
    ks = tuple(k for k in ks if k <= train[0].shape[0]) or (1,)
    num_classes = len(datasets["train"].classes)
    (train_x, train_y), (val_x, val_y) = train, val
    # float16-rounded like eval_knn.py's saved features, so both report the same number (on the device that
    # computed them: the search runs there, no round trip through host memory).
    train_x, val_x = train_x.half().float(), val_x.half().float()
    res = knn_classify(
        train_x, train_y, val_x, val_y, ks, device=dist_info.device, num_classes=num_classes, backend="torch"
    )
    out = {}
    for k, r in res["k"].items():
        out[f"knn_top1_k{k}"] = r["majority"]["top1"]
        out[f"knn_weighted_top1_k{k}"] = r["weighted"]["top1"]
    return out
