"""k-NN evaluation of a frozen backbone (the paper's 1-NN / 20-NN protocol, plus DINO's weighted vote).

Centre-crop features (Resize 256, CenterCrop 224) of train and val, L2-normalised; exact search;
the paper's unweighted majority vote and DINO's temperature-weighted vote (cosine, T = 0.07).

The original's command runs as it was:
    python eval_knn.py --arch resnet18 --batch-size 512 --epoch 130 -k 1 \
        --weights exp/r18/checkpoints/ckpt_epoch_130.pth --save exp/r18/features /path/to/imagenet
An experiment folder alone picks its latest checkpoint and writes to <exp_dir>/features:
    python eval_knn.py /path/to/imagenet --exp_dir exp/r18
All GPUs of a machine (features split across processes, gathered in dataset order):
    torchrun --nproc_per_node=gpu eval_knn.py /path/to/imagenet --exp_dir exp/r18
A teacher, or the untrained baseline, under the same protocol:
    python eval_knn.py /path/to/imagenet --teacher --weights moco_v2_800ep_pretrain.pth.tar --save exp/teacher
    python eval_knn.py /path/to/imagenet --random_init --arch resnet18 --save exp/random_r18
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from models.errors import UserError
from models.io import write_json
from tools.engine import cli, distributed
from tools.engine.cli import note_ignored, positive_float, positive_int, run_cli
from tools.eval.common import add_common_args, features_from_args, prepare_evaluation
from tools.eval.knn import BACKENDS, TIES, knn_classify

log = logging.getLogger("simreg.eval_knn")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("SimReg k-NN evaluation", add_help=add_help)
    add_common_args(p)
    g = p.add_argument_group("k-NN")
    g.add_argument("-k", default="1,20", help="comma-separated k values (default 1,20)")
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="exact search: torch (chunked) or faiss")
    g.add_argument("--chunk", type=positive_int, default=None, help="query rows per similarity block (torch)")
    g.add_argument("--ties", default="random", choices=TIES, help="majority-vote ties: seeded random or nearest")
    g.add_argument("--temperature", type=positive_float, default=0.07, help="weighted vote: exp(cos / T)")
    g.add_argument(
        "--use_cache",
        "--load_cache",
        dest="use_cache",
        action="store_true",
        help="reuse the saved features (refused if they belong to another checkpoint or setting)",
    )
    g.add_argument("--recompute", action="store_true", help="ignore saved features and recompute them")
    g.add_argument("-p", "--print-freq", dest="print_freq", type=positive_int, default=None,
                   help="original flag; no effect (a progress bar shows progress)")  # fmt: skip
    return p


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in str(text).split(",") if k.strip()}))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise UserError(f"-k {text!r}: give positive integers separated by commas, e.g. -k 1,20")
    return ks


def main(args: argparse.Namespace) -> dict | None:
    ks = parse_ks(args.k)
    start = time.perf_counter()
    ev = prepare_evaluation(args, "features", "knn.log")
    if args.print_freq is not None:
        note_ignored("-p/--print-freq", "progress is shown by a bar (and the results by a summary)")
    n_train = len(ev.datasets["train"])
    if max(ks) > n_train:
        raise UserError(f"-k {max(ks)} exceeds the {n_train} training images; choose a smaller k")
    ev.start_log()

    # ============ centre-crop features, in dataset order ============
    reuse = "never" if args.recompute else "require" if args.use_cache else "auto"
    feats = features_from_args(ev, args, ev.out_dir, ev.datasets, reuse, on_device=args.backend != "faiss")

    # ============ k-NN on rank 0 ============
    results = None
    if ev.dist_info.is_main:
        (train_x, train_y), (val_x, val_y) = feats["train"], feats["val"]
        results = knn_classify(
            train_x,
            train_y,
            val_x,
            val_y,
            ks,
            backend=args.backend,
            chunk=args.chunk,
            device=ev.dist_info.device,
            num_classes=len(ev.datasets["train"].classes),
            temperature=args.temperature,
            ties=args.ties,
            seed=args.seed,
        )
        epoch = args.epoch if args.epoch is not None else ev.model.identity.get("epoch") or 0
        write_results(ev.out_dir, results, ev.model, epoch, args, time.perf_counter() - start)
    distributed.barrier()
    distributed.cleanup()
    return results


def write_results(out_dir: str, results: dict, model, epoch: int, args: argparse.Namespace, seconds: float) -> None:
    """The paper's nn_<k>_acc_epoch_<NNN>.txt (majority-vote top-1 %) per k, and knn_results.json."""
    for k, res in results["k"].items():
        np.savetxt(os.path.join(out_dir, f"nn_{k}_acc_epoch_{epoch:03d}.txt"), [res["majority"]["top1"]])
        print(
            f"{k}-NN top-1: {res['majority']['top1']:.2f}% (majority vote) | "
            f"{res['weighted']['top1']:.2f}% (weighted, T={args.temperature})",
            flush=True,
        )
    summary = {
        **results,
        "k": {str(k): v for k, v in results["k"].items()},
        "epoch": epoch,
        "model": model.identity,
        "resize_size": args.resize_size,
        "crop_size": args.crop_size,
        "data": os.path.abspath(args.data),
        "time_s": round(seconds, 2),
    }
    write_json(os.path.join(out_dir, "knn_results.json"), summary)
    log.info("k-NN results in %s (%.1f s)", out_dir, seconds)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
