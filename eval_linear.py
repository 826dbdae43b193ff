"""Linear evaluation of a frozen backbone, the paper's protocol.

Frozen backbone in eval mode -> L2-normalise -> fixed standardisation (mean and unbiased variance of
the normalised centre-crop train features, eps 1e-5) -> Linear. SGD lr 0.01, momentum 0.9, weight
decay 1e-4, batch 256, 40 epochs, lr x0.1 after epochs 15 and 30; RandomResizedCrop (scale 0.08-1) +
flip for training, Resize 256 / CenterCrop 224 for validation. The number to report is the **last
epoch's** val top-1 (the best epoch is given too, labelled as such). Backbone features of the val
set are computed once (the backbone is frozen and deterministic) and the probe is evaluated on them.

The original's command runs as it was:
    python eval_linear.py --arch resnet18 --eval-freq 40 \
        --weights exp/r18/checkpoints/ckpt_epoch_130.pth --save exp/r18/linear /path/to/imagenet
An experiment folder alone picks its latest checkpoint and writes to <exp_dir>/linear
(<exp_dir>/linear_cached with --use_cache):
    torchrun --nproc_per_node=gpu eval_linear.py /path/to/imagenet --exp_dir exp/r18
Fast variant on cached centre-crop features (no augmentation; slightly lower, as in the paper):
    python eval_linear.py /path/to/imagenet --exp_dir exp/r18 --use_cache
A killed run continues from <save>/checkpoint.pth when started again with the same command.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from data.datasets import IndexedImageFolder
from data.loaders import build_loader
from data.transforms import WeakAug
from models.errors import UserError
from models.io import write_json
from tools.engine import cli, distributed
from tools.engine.cli import crop_scale, momentum_float, nonneg_float, nonneg_int, positive_float, positive_int, run_cli
from tools.engine.logs import ScalarWriter, append_json_line
from tools.engine.schedules import set_lr
from tools.engine.step import amp_dtype
from tools.eval.common import (
    Evaluation,
    add_common_args,
    features_from_args,
    output_dir,
    prediction,
    prepare_evaluation,
)
from tools.eval.features import broadcast_tensor
from tools.eval.linear_probe import (
    LinearProbe,
    assert_unchanged,
    evaluate_probe,
    feature_statistics,
    load_probe_checkpoint,
    load_statistics,
    probe_optimizer,
    save_probe_checkpoint,
    save_statistics,
    state_snapshot,
    step_lr,
    train_epoch_cached,
    train_epoch_images,
)

log = logging.getLogger("simreg.eval_linear")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("SimReg linear evaluation", add_help=add_help)
    add_common_args(p)
    g = p.add_argument_group("linear probe")
    g.add_argument("--epochs", type=positive_int, default=40)
    g.add_argument("--start-epoch", dest="start_epoch", type=nonneg_int, default=None, help="original flag; no effect")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=positive_float, default=0.01)
    g.add_argument("--momentum", type=momentum_float, default=0.9)
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonneg_float, default=1e-4)
    g.add_argument("--lr_schedule", default="15,30,40", help="epochs after which the lr drops x0.1 (original)")
    g.add_argument("--eval-freq", dest="eval_freq", type=positive_int, default=1, help="evaluate every N epochs")
    g.add_argument("--min_crop_scale", type=crop_scale, default=0.08, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--no_flip", action="store_true", help="no horizontal flip in the training augmentation")
    g.add_argument("--use_cache", action="store_true", help="train on cached centre-crop features (fast)")
    g.add_argument(
        "--features_dir", default=None, help="feature store (default: <exp_dir>/features, else <save>/../features)"
    )
    g.add_argument("--resume", default="", help="linear probe checkpoint to continue (default: <save>/checkpoint.pth)")
    g.add_argument("--no_resume", action="store_true", help="start over even if a probe checkpoint exists")
    g.add_argument("-p", "--print-freq", dest="print_freq", type=positive_int, default=1, help="log every N epochs")
    g.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the saved probe on val (original)")
    return p


def parse_milestones(text: str, epochs: int) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in text.split(",") if m.strip() and int(m) < epochs)
    except ValueError:
        raise UserError(f"--lr_schedule {text!r}: give epochs separated by commas, e.g. 15,30,40") from None


def probe_settings(args: argparse.Namespace, milestones: tuple[int, ...]) -> dict:
    """What a resumed probe run must agree on."""
    return {
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "milestones": list(milestones),
        "use_cache": args.use_cache,
        "min_crop_scale": args.min_crop_scale,
        "flip": not args.no_flip,
        "seed": args.seed,
    }


# ============ building blocks of main ============
def probe_inputs(args, ev: Evaluation, features_dir: str):
    """(mean, var) on every rank; val (and, with --use_cache, train) features on rank 0."""
    dist_info = ev.dist_info
    stats = load_statistics(ev.out_dir, ev.key) if dist_info.is_main else None
    missing = broadcast_tensor(torch.tensor([float(stats is None)]), (1,), dist_info)  # rank 0 decides
    need_train = args.use_cache or bool(missing.item())
    splits = {s: ds for s, ds in ev.datasets.items() if s == "val" or need_train}
    feats = features_from_args(ev, args, features_dir, splits)
    if dist_info.is_main and stats is None:
        stats = feature_statistics(feats["train"][0])
        save_statistics(ev.out_dir, ev.key, stats[0], stats[1], feats["train"][0].shape[0])
    dim = ev.model.feat_dim
    mean = broadcast_tensor(stats[0] if stats else None, (dim,), dist_info)
    var = broadcast_tensor(stats[1] if stats else None, (dim,), dist_info)
    return mean, var, feats


def resume_probe(args, out_dir, key, settings, probe, optimizer) -> tuple[int, list]:
    path = args.resume or os.path.join(out_dir, "checkpoint.pth")
    if args.resume and not os.path.isfile(path):
        raise UserError(f"--resume '{path}' does not exist")
    if args.no_resume or not os.path.isfile(path):
        return 1, []
    state = load_probe_checkpoint(path, key, settings)
    probe.load_state_dict(state["probe"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed the linear probe from %s after epoch %d", path, state["epoch"])
    return state["epoch"] + 1, list(state["history"])


def train_loader(args, classes, dist_info):
    """Augmented train images (RandomResizedCrop + flip) split across ranks; batch is global."""
    if args.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {args.batch_size} does not divide across {dist_info.world_size} processes")
    aug = WeakAug(args.crop_size, scale=(args.min_crop_scale, 1.0), flip=not args.no_flip)
    dataset = IndexedImageFolder(os.path.join(args.data, "train"), aug, classes, seed=args.seed)
    return build_loader(
        dataset,
        args.batch_size // dist_info.world_size,
        num_workers=args.workers,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=args.seed,
        drop_last=False,  # the original's loader kept the last partial batch
        pin_memory=dist_info.device.type == "cuda",
    )


def summarise(history: list[dict], model, settings: dict, out_dir: str, seconds: float) -> dict:
    evaluated = [h for h in history if "top1" in h]
    last, best = evaluated[-1], max(evaluated, key=lambda h: h["top1"])
    results = {
        "headline": {"metric": "val top-1 of the last epoch (the paper's number)", **_pick(last)},
        "best_epoch": {"metric": "best val top-1 over epochs (for reference, not the protocol)", **_pick(best)},
        "history": history,
        "model": model.identity,
        "settings": settings,
        "time_s": round(seconds, 1),
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    print(f"linear top-1: {last['top1']:.2f}% top-5: {last['top5']:.2f}% (last epoch, {last['epoch']})", flush=True)
    print(f"best epoch {best['epoch']}: top-1 {best['top1']:.2f}% (for reference only)", flush=True)
    return results


def _pick(h: dict) -> dict:
    return {"epoch": h["epoch"], "top1": h["top1"], "top5": h["top5"]}


@dataclass
class ProbeRun:
    """Everything the epochs of one probe run share."""

    probe: LinearProbe
    trainer: torch.nn.Module  # the probe, or DDP around it
    optimizer: torch.optim.Optimizer
    loader: object  # augmented train images, or None with --use_cache
    train: tuple  # cached (features, labels) on the device (rank 0, --use_cache)
    val: tuple  # val (features, labels) on the device (rank 0)
    key: dict
    settings: dict
    out_dir: str
    history: list


def build_probe(args, model, datasets, feats, stats, key, out_dir, dist_info) -> tuple[ProbeRun, int]:
    """The probe (resumed when a matching checkpoint exists) and the first epoch to run."""
    device = dist_info.device
    torch.manual_seed(args.seed)
    probe = LinearProbe(*stats, len(datasets["train"].classes)).to(device)
    optimizer = probe_optimizer(probe.parameters(), args.lr, args.momentum, args.weight_decay)
    settings = probe_settings(args, parse_milestones(args.lr_schedule, args.epochs))
    first_epoch, history = resume_probe(args, out_dir, key, settings, probe, optimizer)
    trainer = probe
    if dist_info.distributed and not args.use_cache:
        trainer = DistributedDataParallel(probe, device_ids=[device.index] if device.type == "cuda" else None)
    loader = None if args.use_cache else train_loader(args, datasets["train"].classes, dist_info)

    def on_device(split: str) -> tuple:  # float16 storage is exact: the features were rounded to it
        x, y = feats[split] if dist_info.is_main else (None, None)
        return (x.to(device, torch.float16), y.to(device)) if dist_info.is_main else ()

    train = on_device("train") if args.use_cache else ()  # held on the device for the whole run
    run = ProbeRun(probe, trainer, optimizer, loader, train, on_device("val"), key, settings, out_dir, history)
    return run, first_epoch


def train_one_epoch(run: ProbeRun, model, args, epoch: int, dist_info) -> dict:
    if args.use_cache:  # seconds per epoch on one device: rank 0 alone, the others wait
        if not dist_info.is_main:
            return {}
        return train_epoch_cached(
            run.probe, *run.train, run.optimizer, batch_size=args.batch_size, seed=args.seed, epoch=epoch
        )
    run.loader.sampler.set_epoch(epoch)
    dtype = amp_dtype(args.amp, dist_info.device)
    return train_epoch_images(
        run.trainer,
        model,
        run.loader,
        run.optimizer,
        device=dist_info.device,
        amp_dtype=dtype,
        epoch=epoch,
        is_main=dist_info.is_main,
    )


def end_epoch(run: ProbeRun, stats: dict, epoch: int, args, writer: ScalarWriter) -> None:
    """Rank 0: evaluate on the val features, checkpoint atomically, log a JSON line."""
    stats = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], **stats}
    if epoch % args.eval_freq == 0 or epoch == args.epochs:
        stats.update(evaluate_probe(run.probe, *run.val))
    run.history.append(stats)
    save_probe_checkpoint(
        os.path.join(run.out_dir, "checkpoint.pth"),
        epoch=epoch,
        key=run.key,
        settings=run.settings,
        probe=run.probe,
        optimizer=run.optimizer,
        history=run.history,
    )
    append_json_line(os.path.join(run.out_dir, "log.jsonl"), stats)
    writer.add({f"linear/{k}": v for k, v in stats.items() if k != "epoch"}, epoch)
    if epoch % args.print_freq == 0 or epoch == args.epochs:
        log.info("linear epoch %d/%d: %s", epoch, args.epochs, _fmt(stats))


def main(args: argparse.Namespace) -> dict | None:
    start = time.perf_counter()
    # Cached-feature probes are another protocol: their own folder, so neither run resumes the other.
    cli.check_paths(files={"--resume": args.resume})
    ev = prepare_evaluation(args, "linear_cached" if args.use_cache else "linear", "linear.log")
    ev.start_log()
    if args.start_epoch is not None:
        cli.note_ignored("--start-epoch", "the probe continues from its own checkpoint (<save>/checkpoint.pth)")
    # The feature store shared with eval_knn.py: <exp>/features, or beside --save (the original's layout).
    features_dir = args.features_dir or output_dir(
        None, ev.exp_dir or os.path.dirname(os.path.abspath(args.save)), "features", prediction(args)
    )
    milestones = parse_milestones(args.lr_schedule, args.epochs)
    model, dist_info = ev.model, ev.dist_info

    # ============ frozen network, statistics ============
    snapshot = state_snapshot(model)
    mean, var, feats = probe_inputs(args, ev, features_dir)

    # ============ the probe, trained ============
    run, first_epoch = build_probe(args, model, ev.datasets, feats, (mean, var), ev.key, ev.out_dir, dist_info)
    if args.evaluate:
        return evaluate_saved(run, first_epoch, dist_info)
    writer = ScalarWriter(ev.out_dir if dist_info.is_main else None)
    for epoch in range(first_epoch, args.epochs + 1):
        set_lr(run.optimizer, step_lr(args.lr, epoch, milestones))
        stats = train_one_epoch(run, model, args, epoch, dist_info)
        if dist_info.is_main:
            end_epoch(run, stats, epoch, args, writer)
        distributed.barrier()
    writer.close()

    # ============ results ============
    assert_unchanged(model, snapshot)  # the protocol's promise: the backbone was never touched
    seconds = time.perf_counter() - start
    results = summarise(run.history, model, run.settings, ev.out_dir, seconds) if dist_info.is_main else None
    distributed.cleanup()
    return results


def evaluate_saved(run: ProbeRun, first_epoch: int, dist_info) -> dict | None:
    """``--evaluate``: the saved probe's val accuracy, no training."""
    if first_epoch == 1:
        raise UserError(f"--evaluate: no linear probe checkpoint in {run.out_dir}; train one first, or give --resume")
    results = evaluate_probe(run.probe, *run.val) if dist_info.is_main else None
    if results:
        print(f"saved probe (epoch {first_epoch - 1}): top-1 {results['top1']:.2f}% top-5 {results['top5']:.2f}%")
    distributed.cleanup()
    return results


def _fmt(stats: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if k != "epoch")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
