"""One network under the paper's protocol: 1-NN and 20-NN (majority vote) and the cached linear probe.

The same library code as ``eval_knn.py`` and ``eval_linear.py --use_cache``: centre-crop features
(rounded to float16, stored with their key), ``knn_classify`` with the default seeded tie-break, and
the probe's fixed standardisation, SGD and step schedule, trained on the cached train features; the
number reported is the last epoch's val top-1.
"""

from __future__ import annotations

import torch

from models.pretrained import EvalModel, load_eval_model, random_init_model
from tools.engine.distributed import DistInfo
from tools.engine.schedules import set_lr
from tools.eval.common import centre_crop_features, eval_datasets, feature_key, fingerprints
from tools.eval.features import FeatureStore
from tools.eval.knn import knn_classify
from tools.eval.linear_probe import (
    LinearProbe,
    evaluate_probe,
    feature_statistics,
    probe_optimizer,
    step_lr,
    train_epoch_cached,
)
from tools.eval.seg_probe import ProbeSettings, segmentation_probe

PROBE = {"lr": 0.01, "batch_size": 256, "milestones": (15, 30), "seed": 0}  # eval_linear.py's defaults
KNN_SEED = 0  # eval_knn.py's default tie-break seed


def network(kind: str, weights: str | None, arch: str, seed: int = 0, use_pred: bool | int = False) -> EvalModel:
    """``kind``: ``student`` (a train_student.py checkpoint), ``teacher`` (a teacher file) or ``random``."""
    if kind == "random":
        return random_init_model(arch, seed)
    return load_eval_model(weights, arch, "auto", use_pred, as_teacher=kind == "teacher")


def evaluate(model: EvalModel, data: str, size: int, store_dir: str, probe_epochs: int = 40) -> dict:
    """{"knn1", "knn20", "linear"}: val top-1 (%) of ``model`` on ``data`` (train/ and val/) at ``size`` px.

    Features (train (N, D), val (M, D)) are stored in ``store_dir`` and reused while their key matches.
    """
    device = torch.device("cpu")
    datasets = eval_datasets(data, size, size, None)
    key = feature_key(model, size, size, None, fingerprints(datasets))
    feats = centre_crop_features(
        model, datasets, FeatureStore(store_dir), key, batch_size=256, workers=0, dist_info=DistInfo(), dtype=None
    )
    (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
    n_classes = len(datasets["train"].classes)
    knn = knn_classify(train_x, train_y, val_x, val_y, (1, 20), device=device, num_classes=n_classes, seed=KNN_SEED)
    linear = linear_probe(train_x, train_y, val_x, val_y, n_classes, probe_epochs)
    return {"knn1": knn["k"][1]["majority"]["top1"], "knn20": knn["k"][20]["majority"]["top1"], "linear": linear}


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, n_classes: int, epochs: int
) -> float:
    """Last-epoch val top-1 (%) of the paper's probe trained on cached features (N, D) -> (M, D)."""
    torch.manual_seed(PROBE["seed"])
    probe = LinearProbe(*feature_statistics(train_x), n_classes)
    optimizer = probe_optimizer(probe.parameters(), PROBE["lr"])
    milestones = tuple(m for m in PROBE["milestones"] if m < epochs)
    train_x, val_x = train_x.to(torch.float16), val_x.to(torch.float16)  # as eval_linear.py holds them
    for epoch in range(1, epochs + 1):
        set_lr(optimizer, step_lr(PROBE["lr"], epoch, milestones))
        train_epoch_cached(
            probe, train_x, train_y, optimizer, batch_size=PROBE["batch_size"], seed=PROBE["seed"], epoch=epoch
        )
    return evaluate_probe(probe, val_x, val_y)["top1"]


def segmentation(model: EvalModel, data: str, store_dir: str, scale) -> dict:
    """{"miou", "pixel_acc"} (%) of ``eval_seg.py``'s probe on the segmentation demo ``data`` at ``scale.seg_size``
    px, for ``scale.seg_probe_epochs`` epochs (maps stored in ``store_dir``)."""
    settings = ProbeSettings(image_size=scale.seg_size, epochs=scale.seg_probe_epochs)
    result, _ = segmentation_probe(model, data, store_dir, settings, torch.device("cpu"))
    return {"miou": result["miou"], "pixel_acc": result["pixel_acc"]}
