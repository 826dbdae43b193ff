"""The benchmark's evaluation stages: k-NN (search and votes), k-NN backends, and the cached linear probe.

"Ours" is what the evaluation scripts run: ``eval_knn.py`` calls :func:`tools.eval.knn.knn_classify`
(search for the largest k, both votes for every k, its tie rule), and ``eval_linear.py --use_cache``
trains :class:`tools.eval.linear_probe.LinearProbe` (with its fixed standardisation) by
``train_epoch_cached`` and ``probe_optimizer``, the features held on the device in float16. The
baselines are the original's (:mod:`tools.bench.baseline`). ``knn_backends`` compares eval_knn's own
backends (``--backend torch`` against ``--backend faiss``) on the same features.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tools.bench.baseline import OriginalCachedProbe, OriginalKnn, faiss_or_none, original_search
from tools.bench.harness import Context, Variant, measure, with_repeat
from tools.eval.knn import default_chunk, faiss_module, knn_classify, knn_search
from tools.eval.linear_probe import LinearProbe, feature_statistics, probe_optimizer, train_epoch_cached

KNN_CLASSES = 1000


def clustered_features(n: int, dim: int, classes: int, seed: int, centres: torch.Tensor | None = None):
    """(features (n, dim) unit rows, labels (n,), centres (classes, dim)): one Gaussian centre per class.

    The noise gives about 50% 1-NN accuracy on 200k x 512, so votes are neither trivial nor random.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) if centres is None else centres
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + 3.5 * torch.randn(n, dim, generator=g)
    return F.normalize(feats, dim=1), labels, centres


def original_knn_variant(p, ctx: Context, train, labels, queries) -> Variant:
    """The original's search + vote where it can run here: faiss on the CPU, or faiss on the GPUs it sees."""
    faiss, ks = faiss_or_none(), (1, p.knn_k)
    if faiss is not None and (ctx.device.type == "cpu" or faiss.get_num_gpus() > 0):
        where = "GPUs, float16 storage" if faiss.get_num_gpus() > 0 else f"CPU, {torch.get_num_threads()} threads"
        knn = OriginalKnn(train, labels, queries, ks, threads=torch.get_num_threads())
        return Variant(f"original: faiss IndexFlatL2 per k ({where}) + Counter vote", knn, "baseline", key="original")
    # No faiss for this device: the same exact L2 order by torch on the device, the original's Python vote.
    knn = OriginalKnn(train, labels, queries, ks, device=ctx.device)
    note = "no faiss for this device: torch L2 search on it (100-query chunks) in faiss's place"
    return Variant("original-style: torch L2 per k + Counter vote", knn, "baseline", note, "original")


def stage_knn(p, ctx: Context) -> list[dict]:
    """Queries/s of eval_knn's k-NN (k = 1 and ``knn_k``, both votes) over clustered unit features."""
    train, labels, centres = clustered_features(p.knn_train, p.knn_dim, KNN_CLASSES, seed=1)
    queries, query_labels, _ = clustered_features(p.knn_queries, p.knn_dim, KNN_CLASSES, seed=2, centres=centres)
    ks, dev = (1, p.knn_k), ctx.device
    results = {}

    def ours() -> int:  # features on the host, as eval_knn holds them; the search runs on the device
        results.update(knn_classify(train, labels, queries, query_labels, ks, backend="torch", device=dev,
                                    num_classes=KNN_CLASSES))  # fmt: skip
        return p.knn_queries

    chunk = default_chunk(p.knn_train, dev)
    variants = [
        original_knn_variant(p, ctx, train, labels, queries),
        Variant(f"ours: eval_knn's knn_classify, torch backend, {chunk}-query blocks", ours, key="ours"),
    ]
    rows = measure("knn", with_repeat(variants), p.rounds, dev, "queries")
    ref = original_search(train.numpy(), queries.numpy(), p.knn_k) if dev.type == "cpu" else None
    mine = knn_search(train, queries, p.knn_k, backend="torch", device=dev)[1].numpy()
    same = float((ref[:, 0] == mine[:, 0]).mean()) if ref is not None else None
    top1 = results["k"][p.knn_k]["majority"]["top1"]
    for row in rows:
        row.update(train_rows=p.knn_train, dim=p.knn_dim, k=list(ks), same_top1_as_baseline=same)
        row["ours_top1_majority"] = top1
    return rows


def stage_probe(p, ctx: Context) -> list[dict]:
    """Feature rows/s of the cached linear probe (batch 256), plus the implied 40-epoch time."""
    feats, labels, _ = clustered_features(p.probe_rows, p.probe_dim, p.probe_classes, seed=3)
    base = OriginalCachedProbe(feats, labels, p.probe_classes, 256, ctx.device)
    probe = LinearProbe(*feature_statistics(feats), p.probe_classes).to(ctx.device)
    optimizer = probe_optimizer(probe.parameters())
    on_device = (feats.to(ctx.device, torch.float16), labels.to(ctx.device))  # as eval_linear holds them
    epochs = iter(range(1, 1 << 30))

    def ours() -> int:  # one epoch per round: the unit eval_linear --use_cache runs
        train_epoch_cached(probe, *on_device, optimizer, batch_size=256, seed=0, epoch=next(epochs))
        return p.probe_rows

    variants = [
        Variant("original: host TensorDataset, sync per step", partial(base.run, p.probe_baseline_steps),
                "baseline", key="original"),
        Variant("ours: eval_linear --use_cache (LinearProbe, train_epoch_cached)", ours, key="ours"),
    ]  # fmt: skip
    rows = measure("probe", with_repeat(variants), p.rounds, ctx.device, "feature rows")
    for row in rows:
        if row["img_s"]:
            row["forty_epochs_s"] = 40 * p.probe_rows / row["img_s"]
            row["rows"] = p.probe_rows
    return rows


# ============ stage: eval_knn's backends against each other ============
def knn_backends(names: str) -> list[str]:
    """``torch,faiss`` -> the backends to time, faiss (the reference) first; faiss left out when not installed."""
    chosen = [b.strip() for b in names.split(",") if b.strip()]
    if "faiss" in chosen and faiss_module() is None:
        chosen.remove("faiss")
    return sorted(chosen, key=lambda b: b != "faiss")


def stage_knn_backends(p, ctx: Context) -> list[dict]:
    """Queries/s of eval_knn's ``knn_classify`` (search and both votes for k) with each backend, same features.

    The first backend (faiss when installed) is the baseline. Every row also says the top-1 of both votes
    and in what percentage of queries its k neighbours equal the baseline's (computed outside the timing).
    """
    train, labels, centres = clustered_features(p.knn_train, p.knn_dim, p.knn_classes, seed=1)
    queries, query_labels, _ = clustered_features(p.knn_queries, p.knn_dim, p.knn_classes, seed=2, centres=centres)
    backends, chunk, results = knn_backends(p.knn_backends), p.knn_chunk or None, {}

    def search(backend: str):
        def run() -> int:
            results[backend] = knn_classify(train, labels, queries, query_labels, (p.knn_k,), backend=backend,
                                            chunk=chunk, device=ctx.device)["k"][p.knn_k]  # fmt: skip
            return p.knn_queries

        return run

    shape = f"{tuple(train.shape)} x {p.knn_queries} queries k={p.knn_k} on {ctx.device.type}"
    variants = [Variant(f"{b} {shape}", search(b), "baseline" if i == 0 else "variant", key=b)
                for i, b in enumerate(backends)]  # fmt: skip
    rows = measure("knn_backends", with_repeat(variants), p.rounds, ctx.device, "queries")
    found = {b: knn_search(train, queries, p.knn_k, backend=b, chunk=chunk, device=ctx.device)[1] for b in backends}
    for row in rows:
        backend = row["config"].split(" ")[0]
        same = (found[backend] == found[backends[0]]).all(1).double().mean().item()
        votes = results[backend]
        row.update(top1_majority=votes["majority"]["top1"], top1_weighted=votes["weighted"]["top1"],
                   same_neighbours_rows_pct=100.0 * same, train_rows=p.knn_train, dim=p.knn_dim, k=p.knn_k)  # fmt: skip
    return rows
