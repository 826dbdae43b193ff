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
import logging
import statistics
import time

import torch

from models.errors import UserError
from models.io import write_json
from tools.bench.eval_stages import clustered_features
from tools.engine import cli
from tools.engine.distributed import pick_device
from tools.engine.logs import setup_logging
from tools.eval.knn import faiss_module, knn_classify, knn_search
from tools.eval.linear_probe import LinearProbe, feature_statistics, probe_optimizer, step_lr, train_epoch_cached

log = logging.getLogger("simreg.bench_knn")
BACKENDS = ("torch", "faiss")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_search(train, train_y, test, test_y, args, device) -> list[dict]:
    backends = args.backends
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
    opt = probe_optimizer(probe.parameters())  # eval_linear's SGD
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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("k-NN search benchmark", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n_train", type=cli.positive_int, default=200_000, help="train feature rows")
    p.add_argument("--n_test", type=cli.positive_int, default=2_000, help="query rows")
    p.add_argument("--dim", type=cli.positive_int, default=512, help="feature dimension")
    p.add_argument("--classes", type=cli.positive_int, default=1000, help="number of classes (clusters)")
    p.add_argument("-k", type=cli.positive_int, default=20, help="neighbours per query (at most --n_train)")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="interleaved repeats per backend")
    p.add_argument("--backends", default="torch,faiss", help="comma-separated: torch, faiss")
    p.add_argument("--chunk", type=cli.positive_int, default=None, help="torch backend: query rows per block")
    p.add_argument("--device", type=cli.device_name, default="cpu", help="cpu, cuda or cuda:N (auto: cuda if any)")
    p.add_argument("--linear_probe", action="store_true", help="also time the cached 40-epoch linear probe")
    p.add_argument("--json", default=None, help="write the rows to this file")
    cli.add_debug_flag(p)
    return p


def check_args(args: argparse.Namespace) -> torch.device:
    """Every flag against what this machine can do, before any features are drawn; returns the device."""
    device = pick_device(args.device)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UserError(f"--backends {args.backends}: choose from {', '.join(BACKENDS)}, comma-separated")
    if "faiss" in names and faiss_module() is None:
        log.warning("--backends: faiss is not installed (pip install faiss-cpu); timing %s only", "torch")
        names.remove("faiss")
    if not names:
        raise UserError("--backends faiss needs the faiss package: pip install faiss-cpu, or add torch")
    if args.k > args.n_train:
        raise UserError(f"-k {args.k} is more than --n_train {args.n_train}; choose k <= the train rows")
    # train and test features, their clusters' noise, one float32 similarity block: a few copies of each
    need = 4 * (3 * (args.n_train + args.n_test) * args.dim + args.classes * args.dim)
    cli.check_fits(need, f"--n_train {args.n_train} x --dim {args.dim}", "the features", "choose fewer rows")
    cli.check_output_file("--json", args.json)
    args.backends = names
    return device


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging(None, True, args.debug)
    device = check_args(args)
    train, train_y, centres = clustered_features(args.n_train, args.dim, args.classes, seed=1)
    test, test_y, _ = clustered_features(args.n_test, args.dim, args.classes, seed=2, centres=centres)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; device {device}", flush=True)
    rows = bench_search(train, train_y, test, test_y, args, device)
    if args.linear_probe:
        rows.append(bench_linear_probe(train, train_y, args.classes, device))
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
