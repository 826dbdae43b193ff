"""k-NN search benchmark: the torch backend against faiss on the same features, interleaved.

    python -m tools.bench_knn                                   # CPU: 200k x 512 train, 2k queries, k=20
    python -m tools.bench_knn --device cuda --n_train 1281167 --n_test 50000 --linear_probe

Features are clustered (one Gaussian centre per class plus noise, L2-normalised) so accuracy means
something. Each repeat runs every backend once (interleaved, so machine noise hits all alike); the
table gives the median seconds, the spread (max - min) and the majority- and weighted-vote top-1,
which must be identical across backends. ``--linear_probe`` also times the cached linear probe's
40 epochs (batch 256) on the same train features.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from tools.eval.knn import faiss_module, knn_classify, knn_search
from tools.eval.linear_probe import LinearProbe, feature_statistics, step_lr, train_epoch_cached


def clustered_features(n: int, dim: int, classes: int, seed: int, centres: torch.Tensor | None = None):
    """(features (n, dim) unit rows, labels (n,), centres (classes, dim))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) if centres is None else centres
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + 3.5 * torch.randn(n, dim, generator=g)  # noise: ~50% 1-NN on 200k x 512
    return F.normalize(feats, dim=1), labels, centres


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_search(train, train_y, test, test_y, args, device) -> list[dict]:
    backends = [b for b in args.backends.split(",") if b != "faiss" or faiss_module() is not None]
    times = {b: [] for b in backends}
    results, neighbours = {}, {}
    for _ in range(args.repeats):
        for backend in backends:
            sync(device)
            start = time.perf_counter()
            kw = dict(backend=backend, chunk=args.chunk, device=device)
            res = knn_classify(train, train_y, test, test_y, (args.k,), **kw)
            sync(device)
            times[backend].append(time.perf_counter() - start)
            results[backend] = res["k"][args.k]
    for backend in backends:  # neighbour identity, outside the timed runs
        neighbours[backend] = knn_search(train, test, args.k, backend=backend, chunk=args.chunk, device=device)[1]
    ref = backends[0]
    rows = []
    for backend in backends:
        t = times[backend]
        same = (neighbours[backend] == neighbours[ref]).all(1).double().mean().item()
        rows.append(
            {
                "stage": "knn_search",
                "config": f"{backend} {tuple(train.shape)} x {test.shape[0]} queries k={args.k} on {device.type}",
                "seconds_median": statistics.median(t),
                "spread": max(t) - min(t),
                "ratio_vs_faiss": None,
                "top1_majority": results[backend]["majority"]["top1"],
                "top1_weighted": results[backend]["weighted"]["top1"],
                "same_neighbours_rows_pct": 100.0 * same,
            }
        )
    if "faiss" in times:
        for row, backend in zip(rows, backends, strict=True):
            row["ratio_vs_faiss"] = statistics.median(times[backend]) / statistics.median(times["faiss"])
    return rows


def bench_linear_probe(train, train_y, classes: int, device: torch.device, epochs: int = 40) -> dict:
    """Seconds for the cached probe's ``epochs`` epochs (batch 256, SGD 0.01, x0.1 at 15 and 30)."""
    feats, labels = train.to(device, torch.float16), train_y.to(device)
    probe = LinearProbe(*feature_statistics(train), classes).to(device)
    opt = torch.optim.SGD(probe.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sync(device)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = step_lr(0.01, epoch, (15, 30))
        stats = train_epoch_cached(probe, feats, labels, opt, batch_size=256, seed=0, epoch=epoch)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "stage": "linear_probe_cached",
        "config": f"{tuple(train.shape)} {classes} classes, {epochs} epochs, batch 256 on {device.type}",
        "seconds_median": seconds,
        "train_top1_last_epoch": stats["train_top1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_train", type=int, default=200_000)
    p.add_argument("--n_test", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--chunk", type=int, default=None, help="torch backend: query rows per block (default: auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--linear_probe", action="store_true", help="also time the cached 40-epoch linear probe")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    train, train_y, centres = clustered_features(args.n_train, args.dim, args.classes, seed=1)
    test, test_y, _ = clustered_features(args.n_test, args.dim, args.classes, seed=2, centres=centres)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; device {device}", flush=True)
    rows = bench_search(train, train_y, test, test_y, args, device)
    if args.linear_probe:
        rows.append(bench_linear_probe(train, train_y, args.classes, device))
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
