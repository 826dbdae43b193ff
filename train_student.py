"""SimReg distillation: a student (backbone + prediction MLP) regresses a frozen teacher's features.

One process (CPU or one GPU):
    python train_student.py /path/to/imagenet --arch_teacher resnet50 --arch_student resnet18 \
        --teacher_weights moco_v2_800ep_pretrain.pth.tar --single_aug --weak_weak --exp_dir exp/r18

All GPUs of one machine (``--batch_size`` is the global batch, split across the processes):
    torchrun --nproc_per_node=gpu train_student.py /path/to/imagenet ...same flags...

Several machines: the same command on each node with ``--nnodes N --node_rank R
--rdzv_backend c10d --rdzv_endpoint HOST:PORT``; under SLURM, ``srun torchrun ...`` (see README).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.datasets import IndexedImageFolder, select_classes
from data.decode import DECODERS
from data.loaders import build_loader
from data.transforms import TrainViews
from models.backbones import BACKBONES, canonical_arch
from models.errors import UserError
from models.fold import compile_frozen
from models.formats import FORMATS, convert, file_sha256, load_strict, safe_load
from models.heads import HEAD_LAYERS
from models.loss import regression_loss
from models.student import Student
from models.teachers import load_teacher, teacher_arch_names
from tools import distributed
from tools.checkpoint import (
    CHECKPOINT_VERSION,
    atomic_save,
    checkpoint_paths,
    epoch_checkpoint_path,
    load_latest_checkpoint,
    load_training_checkpoint,
    rng_state,
    set_rng_state,
)
from tools.cli import add_debug_flag, resolve_exp_dir, run_cli
from tools.evaluation import eval_datasets
from tools.knn import knn_monitor
from tools.metric_logger import ScalarWriter, append_json_line, setup_logging, write_json
from tools.progress import EpochProgress, Meters, stop_agreed
from tools.schedules import cosine_lr, set_lr
from tools.signals import Interrupted, StopRequest
from tools.teacher_cache import open_cached_teacher

log = logging.getLogger("simreg.train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimReg distillation", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("data", help="dataset root holding train/ (and val/) in ImageFolder layout")
    g.add_argument(
        "--dataset",
        default="imagenet",
        choices=["imagenet", "imagenet100"],
        help="imagenet100: the original's 100-class subset (seeded draw over the class folders)",
    )
    g.add_argument("--class_list", default=None, help="file of class folder names to train on, one per line")
    g.add_argument("--image_size", type=int, default=224, help="training crop size in pixels")
    g.add_argument("--single_aug", action="store_true", help="one view fed to both networks (the paper's best)")
    g.add_argument("--weak_weak", action="store_true", help="weak augmentation for teacher and student")
    g.add_argument("--weak_strong", action="store_true", help="weak view for the teacher, strong for the student")
    g.add_argument("--num_workers", type=int, default=8, help="data loading processes per rank")
    g.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="replace unreadable images by the next readable one (counted and reported) instead of stopping",
    )
    g.add_argument(
        "--decode",
        default="auto",
        choices=list(DECODERS),
        help="JPEG decoding of the single view: auto (fastest, same crops), pil (the reference path)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch_teacher",
        default=None,
        help=f"teacher architecture, one of {', '.join(teacher_arch_names())}; default: the checkpoint's",
    )
    g.add_argument("--arch_student", default="resnet18", help=f"one of {', '.join(BACKBONES)}, or mobilenet")
    g.add_argument("--teacher_weights", default=None, help="teacher checkpoint file (any supported format)")
    g.add_argument("--teacher_format", default="auto", help=f"teacher checkpoint layout: auto, {', '.join(FORMATS)}")
    g.add_argument("--n_mlp_layers", type=int, default=4, choices=HEAD_LAYERS, help="prediction head depth")
    g.add_argument("--linear_pred", action="store_true", help="alias of --n_mlp_layers 0 (linear predictor)")
    g.add_argument(
        "--teacher_fc",
        action="store_true",
        help="regress the checkpoint's projection output (MoCo fc, SwAV projection_head, ...), not its pooled feature",
    )
    g.add_argument("--use_cache", action="store_true", help="regress cached teacher features (no teacher network)")
    g.add_argument(
        "--teacher_feats", default=None, help="teacher feature cache FILE.npy (tools.cache_teacher_features)"
    )
    g.add_argument(
        "--cache_on_device", action="store_true", help="with --use_cache: copy the cache into device memory if it fits"
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=130)
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch size, split across processes")
    g.add_argument("--learning_rate", type=float, default=0.05)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--sgd_momentum", type=float, default=0.9)

    g = p.add_argument_group("runtime")
    g.add_argument("--exp_dir", default=None, help="experiment folder (default: <base_dir>/exp/<exp>)")
    g.add_argument("--base_dir", default="./", help="experiment root (original flag)")
    g.add_argument("--exp", default="simreg", help="experiment name under <base_dir>/exp (original flag)")
    g.add_argument("--resume", default="", help="continue a run from this training checkpoint")
    g.add_argument("--no_resume", action="store_true", help="do not resume from the experiment's latest checkpoint")
    g.add_argument("--weights", default=None, help="initialise the student from this checkpoint, start at epoch 1")
    g.add_argument("--save_freq", type=int, default=10, help="keep ckpt_epoch_<N>.pth every N epochs")
    g.add_argument("--print_freq", type=int, default=100, help="log the loss every N steps")
    g.add_argument(
        "--ckpt_every_steps",
        type=int,
        default=0,
        help="also write a mid-epoch checkpoint every N steps (long epochs on preemptible clusters)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast precision; auto = bf16 on CUDA, fp32 on CPU (the loss is always fp32)",
    )
    g.add_argument("--channels_last", action="store_true", help="NHWC memory layout for both networks")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument(
        "--compile_teacher", action="store_true", help="fold the teacher's BatchNorm into its convs, torch.compile it"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--knn_every",
        type=int,
        default=0,
        help="every N epochs (and the last) log k-NN top-1 on val/ (features on all ranks, search on rank 0)",
    )
    g.add_argument("--knn_resize_size", type=int, default=0, help="k-NN monitor resize (0: image_size * 256/224)")
    add_debug_flag(p)
    return p


@dataclass
class StepConfig:
    """How training steps run (not what they compute)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    print_freq: int
    is_main: bool = True
    distributed: bool = False
    ckpt_every_steps: int = 0  # 0: checkpoints at epoch ends only
    stop: StopRequest | None = None


def to_device_images(batch: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on the device; the networks normalise inside."""
    x = batch.to(cfg.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float().div_(255.0)


def distill_step(model, teacher, views, index: torch.Tensor, optimizer, scaler, cfg: StepConfig) -> torch.Tensor:
    """One optimisation step on a loader batch; returns the detached loss on the device (no host sync).

    ``views`` is one uint8 batch (B, 3, H, W) fed to both networks (single view) or a pair
    (student view, teacher view). The teacher runs under inference mode: no autograd bookkeeping.
    """
    x_s = to_device_images(views[0] if isinstance(views, (list, tuple)) else views, cfg)
    x_t = to_device_images(views[1], cfg) if isinstance(views, (list, tuple)) else x_s
    autocast = torch.autocast(cfg.device.type, dtype=cfg.amp_dtype or torch.float32, enabled=cfg.amp_dtype is not None)
    with torch.inference_mode(), autocast:
        target = teacher.targets(x_t, index)  # host indices: a cache gathers there
    target = target.clone()  # an inference-mode tensor cannot be saved for the loss's backward
    with autocast:
        pred = model(x_s)
    loss = regression_loss(pred, target)  # fp32, outside autocast
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(
    student, teacher, loader, optimizer, scaler, epoch: int, cfg: StepConfig, progress=None, on_checkpoint=None
) -> dict:
    """One pass over ``loader`` (the rest of it when ``progress`` resumes a partial epoch).

    ``teacher.targets(images, indices)`` gives the regression targets (B, D). The loss is summed on the
    device and read back only every ``print_freq`` steps (and at checkpoints), so steps do not wait for
    the host. ``on_checkpoint(epoch, EpochProgress)`` is called every ``cfg.ckpt_every_steps`` steps and
    when a stop signal arrives (then :class:`Interrupted` is raised). Returns the epoch's mean loss
    over all ranks and its throughput.
    """
    progress = progress or EpochProgress()
    student.train()
    dev = cfg.device
    meters = Meters(dev, progress if cfg.is_main else EpochProgress(step=progress.step))
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not cfg.is_main, leave=False, dynamic_ncols=True)
    for views, _, index in bar:
        loss = distill_step(student, teacher, views, index, optimizer, scaler, cfg)
        meters.update(loss, index.shape[0])
        at_print = meters.step % cfg.print_freq == 0
        if at_print:
            avg = meters.check(epoch)  # host sync, every print_freq steps only
            bar.set_postfix(loss=f"{avg:.4f}")
            log.info("epoch %d step %d/%d loss %.4f", epoch, meters.step, progress.step + len(loader), avg)
        at_ckpt = bool(cfg.ckpt_every_steps) and meters.step % cfg.ckpt_every_steps == 0
        stop = stop_agreed(cfg.stop, cfg.device, cfg.distributed, at_print or at_ckpt)
        if on_checkpoint and (stop or at_ckpt):
            meters.check(epoch)  # never save weights that have gone NaN
            on_checkpoint(epoch, meters.reduced())
        if stop:
            raise Interrupted(f"stopped by signal in epoch {epoch} after step {meters.step}")
    bar.close()
    return meters.summary(epoch)


# ============ building blocks of main ============
def build_dataset(args, dist_info) -> IndexedImageFolder:
    train_dir = os.path.join(args.data, "train")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder '{args.data}' does not exist; give the dataset root as the first argument")
    if not os.path.isdir(train_dir):
        raise UserError(f"data folder '{args.data}' has no train/ sub-folder; expected <data>/train/<class>/<image>")
    classes = select_classes(args.data, args.class_list, args.dataset)
    views = TrainViews(args.image_size, args.single_aug, args.weak_weak, args.weak_strong, args.decode)
    dataset = IndexedImageFolder(train_dir, views, classes, seed=args.seed, skip_bad=args.skip_bad_images)
    log.info(
        "data: %d images in %d classes from %s; %s, %d px",
        len(dataset),
        len(dataset.classes),
        train_dir,
        views.name,
        args.image_size,
    )
    if len(dataset) < args.batch_size:
        raise UserError(f"the training set has {len(dataset)} images, fewer than --batch_size {args.batch_size}")
    return dataset


def build_teacher(args, device: torch.device, dataset: IndexedImageFolder | None = None):
    """The live frozen teacher, or with --use_cache the cached one (same ``targets(images, indices)`` call)."""
    if args.use_cache or args.teacher_feats:
        if not (args.use_cache and args.teacher_feats):
            raise UserError(
                "--use_cache and --teacher_feats FILE.npy go together (the cache comes from "
                "python -m tools.cache_teacher_features); pass both, or neither for a live teacher"
            )
        teacher = {"arch": args.arch_teacher, "weights": args.teacher_weights, "use_fc": args.teacher_fc}
        return open_cached_teacher(
            args.teacher_feats, dataset, device, args.cache_on_device, args.image_size, teacher=teacher
        )
    if not args.teacher_weights:
        raise UserError("no teacher given; pass --teacher_weights FILE (a MoCo, torchvision, ... checkpoint)")
    teacher = load_teacher(args.teacher_weights, args.arch_teacher, args.teacher_format, use_fc=args.teacher_fc)
    teacher = teacher.to(device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if args.compile_teacher:  # inference only: BatchNorm on running statistics folds into the convs
        teacher.encoder = compile_frozen(teacher.encoder)
    return teacher


def build_optimizer(params, args, device: torch.device) -> torch.optim.Optimizer:
    """The paper's SGD; the fused kernel (one launch for all parameters) where the device has one."""
    return torch.optim.SGD(
        params,
        lr=args.learning_rate,
        momentum=args.sgd_momentum,
        weight_decay=args.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def init_student_weights(student: Student, path: str) -> None:
    """``--weights``: load a student backbone (and its head, when the layout matches) from any student file."""
    fmt, conv = convert(safe_load(path, "--weights"), "auto", path)
    load_strict(student.encoder.backbone, conv.backbone, path, "student backbone")
    if conv.head is not None and {k: v.shape for k, v in conv.head.items()} == {
        k: v.shape for k, v in student.head.state_dict().items()
    }:
        student.head.load_state_dict(conv.head)
        log.info("student backbone and head initialised from %s (%s)", path, fmt)
    else:
        log.info("student backbone initialised from %s (%s); head starts fresh", path, fmt)


@dataclass
class Run:
    """What a training checkpoint saves and restores."""

    args: argparse.Namespace
    exp_dir: str
    student: Student
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    identity: dict
    is_main: bool = True


def run_identity(args, dataset: IndexedImageFolder, teacher) -> dict:
    """What defines a run: resuming with other data, teacher or student is refused (more epochs are fine)."""
    return {
        "n_images": len(dataset),
        "classes": hashlib.sha1("\n".join(dataset.classes).encode()).hexdigest(),
        "teacher": teacher_fingerprint(args, teacher),
        "arch_student": args.arch_student,
        "n_mlp_layers": args.n_mlp_layers,
        "image_size": args.image_size,
        "views": dataset.transform.name,
    }


def teacher_fingerprint(args, teacher) -> str:
    """Architecture, format, head choice and the weights' SHA-256 (a cache records the teacher it came from)."""
    manifest = getattr(teacher, "manifest", None)
    if manifest is not None:
        t = manifest["teacher"]
        return f"{t['arch']}/{t['format']}/fc={t['use_fc']}/{t['weights_sha256']}"
    return f"{teacher.arch}/{teacher.fmt}/fc={args.teacher_fc}/{file_sha256(args.teacher_weights)}"


def resume(run: Run) -> tuple[int, EpochProgress]:
    """Continue from ``--resume`` or the experiment's latest checkpoint.

    Returns the first epoch to run and how much of it is already done (mid-epoch checkpoints).
    """
    args = run.args
    if args.resume and args.weights:
        raise UserError("--weights and --resume were both given; --resume continues a run, --weights starts a new one")
    if args.resume:
        found = (args.resume, load_training_checkpoint(args.resume))
    else:
        found = None if args.no_resume else load_latest_checkpoint(run.exp_dir)
    if found is None:
        if args.weights:
            init_student_weights(run.student, args.weights)
        return 1, EpochProgress()
    path, ckpt = found
    old = ckpt.get("identity", {})
    diff = [f"{k}: {old.get(k)} -> {v}" for k, v in run.identity.items() if old.get(k) != v]
    if diff:
        raise UserError(
            f"'{path}' belongs to a different run ({'; '.join(diff)}); use another --exp_dir, or --no_resume "
            "to overwrite it"
        )
    if args.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {args.epochs} is below the {ckpt['epoch']} epochs already done in '{path}'")
    load_strict(run.student.encoder.backbone, ckpt["student"], path, "student backbone")
    load_strict(run.student.head, ckpt["head"], path, "student head")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    progress = EpochProgress(**ckpt["progress"]) if ckpt.get("progress") else EpochProgress()
    log.info("resumed from %s: %d epochs done, %d steps into the next", path, ckpt["epoch"], progress.step)
    return ckpt["epoch"] + 1, progress


def save_checkpoint(run: Run, epoch: int, progress: EpochProgress | None = None) -> None:
    """Rank 0 writes the latest checkpoint (the one it replaces is kept as the fallback).

    With ``progress`` the checkpoint is mid-epoch: ``epoch`` - 1 epochs are done plus ``progress.step``
    steps of ``epoch``. At epoch ends, every ``--save_freq`` epochs, it is also kept as ckpt_epoch_<N>.pth.
    """
    if not run.is_main:
        return
    done = epoch - 1 if progress else epoch
    state = {
        "version": CHECKPOINT_VERSION,
        "epoch": done,
        "progress": asdict(progress) if progress else None,
        "identity": run.identity,
        "args": vars(run.args),
        "student": run.student.backbone_state_dict(),
        "head": run.student.head.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
    }
    paths = checkpoint_paths(run.exp_dir)
    atomic_save(state, paths["latest"], keep_previous=paths["previous"])
    if not progress and (epoch % run.args.save_freq == 0 or epoch == run.args.epochs):
        atomic_save(state, epoch_checkpoint_path(run.exp_dir, epoch))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def main(args: argparse.Namespace) -> dict:
    if args.linear_pred:
        args.n_mlp_layers = 0  # the original's flag for the linear predictor
    args.arch_student = canonical_arch(args.arch_student)
    dist_info = distributed.init_distributed(args.device)
    exp_dir = resolve_exp_dir(args.exp_dir, args.base_dir, args.exp)
    setup_logging(os.path.join(exp_dir, "logs", "train.log"), dist_info.is_main, args.debug)
    if args.batch_size % dist_info.world_size:
        raise UserError(
            f"--batch_size {args.batch_size} (global) does not divide across {dist_info.world_size} "
            "processes; choose a multiple of the process count"
        )
    torch.manual_seed(args.seed)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ============ preparing data ============
    dataset = build_dataset(args, dist_info)
    per_rank_batch = args.batch_size // dist_info.world_size
    loader = build_loader(
        dataset,
        per_rank_batch,
        num_workers=args.num_workers,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=args.seed,
        pin_memory=dist_info.device.type == "cuda",
    )

    # ============ building teacher and student ============
    teacher = build_teacher(args, dist_info.device, dataset)
    student = Student(args.arch_student, teacher.feat_dim, args.n_mlp_layers).to(dist_info.device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(student.parameters(), args, dist_info.device)
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.amp == "fp16")
    run = Run(args, exp_dir, student, optimizer, scaler, run_identity(args, dataset, teacher), dist_info.is_main)
    start_epoch, progress = resume(run)
    model = student
    if dist_info.distributed:  # DDP wraps the trainable part only; the teacher stays a plain module
        model = DistributedDataParallel(
            student, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None
        )
    if args.compile:
        model = torch.compile(model)

    # ============ training ============
    if dist_info.is_main:
        write_json(os.path.join(exp_dir, "logs", "train_args.json"), vars(args))
    writer = ScalarWriter(os.path.join(exp_dir, "logs") if dist_info.is_main else None)
    stop = StopRequest().install()
    cfg = StepConfig(
        dist_info.device, amp_dtype(args.amp, dist_info.device), args.channels_last, args.print_freq,
        dist_info.is_main, dist_info.distributed, args.ckpt_every_steps, stop,
    )  # fmt: skip
    stats = {}
    knn_sets = monitor_datasets(args, dataset.classes) if args.knn_every else None
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            lr = cosine_lr(args.learning_rate, epoch, args.epochs)
            set_lr(optimizer, lr)
            loader.sampler.set_epoch(epoch, start=progress.step * per_rank_batch)
            stats = train_one_epoch(
                model, teacher, loader, optimizer, scaler, epoch, cfg, progress, partial(save_checkpoint, run)
            )
            stats = {"epoch": epoch, "lr": lr, **stats, "bad_images_skipped": dataset.bad_images_seen()}
            progress = EpochProgress()
            if knn_sets and (epoch % args.knn_every == 0 or epoch == args.epochs):  # the same k-NN as eval_knn.py
                kw = dict(batch_size=per_rank_batch, workers=args.num_workers, device=dist_info.device,
                          amp_dtype=cfg.amp_dtype)  # fmt: skip
                stats.update(knn_monitor(student.encoder, knn_sets, **kw))
            save_checkpoint(run, epoch)
            log_epoch(exp_dir, writer, stats, args.epochs, dist_info.is_main)
            distributed.barrier()
    except Interrupted as exc:
        log.warning("%s; checkpoint saved in %s - rerun the same command to resume", exc, exp_dir)
        return {"interrupted": True, **stats}
    finally:
        stop.uninstall()
        writer.close()
    finish(exp_dir, student, dist_info.is_main)
    distributed.cleanup()
    return stats


def log_epoch(exp_dir: str, writer: ScalarWriter, stats: dict, epochs: int, is_main: bool) -> None:
    if not is_main:
        return
    append_json_line(os.path.join(exp_dir, "logs", "train_log.jsonl"), stats)
    writer.add({"train/loss": stats["loss"], "train/lr": stats["lr"], "train/images_per_s": stats["images_per_s"]},
               stats["epoch"])  # fmt: skip
    log.info("epoch %d/%d: loss %.4f, lr %.4g, %.0f images/s", stats["epoch"], epochs, stats["loss"], stats["lr"],
             stats["images_per_s"])  # fmt: skip
    writer.add({f"knn/{k[4:]}": v for k, v in stats.items() if k.startswith("knn_")}, stats["epoch"])
    if stats["bad_images_skipped"]:
        log.warning("%d unreadable image(s) skipped so far (--skip_bad_images)", stats["bad_images_skipped"])


def monitor_datasets(args, classes: list[str]) -> dict:
    """Centre-crop train/ and val/ for --knn_every (resize 256 for 224 px crops, the same ratio otherwise)."""
    resize = args.knn_resize_size or round(args.image_size * 256 / 224)
    return eval_datasets(args.data, resize, args.image_size, classes)


def finish(exp_dir: str, student: Student, is_main: bool) -> None:
    if not is_main:
        return
    export = os.path.join(exp_dir, "checkpoints", "student_backbone.pth")
    atomic_save(student.backbone_state_dict(), export)
    log.info("done. checkpoints: %s", os.path.join(exp_dir, "checkpoints"))
    log.info("logs (train.log, train_log.jsonl, TensorBoard): %s", os.path.join(exp_dir, "logs"))
    log.info("exported backbone (loads into torchvision, no fc): %s", export)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
