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
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.datasets import IndexedImageFolder, imagenet100_classes, list_class_folders, read_class_list
from data.loaders import build_loader
from data.transforms import TrainViews
from models.backbones import BACKBONES, canonical_arch
from models.errors import UserError
from models.formats import convert, load_strict, safe_load
from models.heads import HEAD_LAYERS
from models.loss import regression_loss
from models.student import Student
from models.teachers import load_teacher
from tools import distributed
from tools.checkpoint import (
    CHECKPOINT_VERSION,
    atomic_save,
    checkpoint_paths,
    epoch_checkpoint_path,
    load_training_checkpoint,
    rng_state,
    set_rng_state,
)
from tools.cli import add_debug_flag, resolve_exp_dir, run_cli
from tools.evaluation import eval_datasets
from tools.knn import knn_monitor
from tools.metric_logger import ScalarWriter, append_json_line, setup_logging, write_json
from tools.schedules import cosine_lr, set_lr

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

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch_teacher",
        default=None,
        help="teacher architecture; default: read from the checkpoint (resnet50 for the paper)",
    )
    g.add_argument("--arch_student", default="resnet18", help=f"one of {', '.join(BACKBONES)}, or mobilenet")
    g.add_argument("--teacher_weights", default=None, help="teacher checkpoint file (any supported format)")
    g.add_argument("--teacher_format", default="auto", help="teacher checkpoint layout; auto detects it")
    g.add_argument("--n_mlp_layers", type=int, default=4, choices=HEAD_LAYERS, help="prediction head depth")
    g.add_argument("--linear_pred", action="store_true", help="alias of --n_mlp_layers 0 (linear predictor)")
    g.add_argument("--use_cache", action="store_true", help="regress cached teacher features")
    g.add_argument("--teacher_feats", default=None, help="teacher feature cache (.npy) for --use_cache")

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
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast precision; auto = bf16 on CUDA, fp32 on CPU (the loss is always fp32)",
    )
    g.add_argument("--channels_last", action="store_true", help="NHWC memory layout for both networks")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
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
    """How one training step runs (not what it computes)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    print_freq: int
    is_main: bool = True


def to_device_images(batch: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] on the device; the networks normalise inside."""
    x = batch.to(cfg.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float().div_(255.0)


def train_one_epoch(student, teacher, loader, optimizer, scaler, epoch: int, cfg: StepConfig) -> dict:
    """One pass over ``loader``; returns the epoch's mean loss (over all ranks) and throughput.

    ``teacher.targets(images, indices)`` gives the regression targets (B, D); the loss is averaged on
    the device and read back only every ``print_freq`` steps, so steps do not wait for the host.
    """
    student.train()
    loss_sum = torch.zeros((), device=cfg.device)
    n_steps, n_images, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not cfg.is_main, leave=False, dynamic_ncols=True)
    autocast = torch.autocast(cfg.device.type, dtype=cfg.amp_dtype or torch.float32, enabled=cfg.amp_dtype is not None)
    for views, _, index in bar:
        # The single-view mode hands one tensor that both networks see; otherwise (student, teacher).
        x_s = to_device_images(views[0] if isinstance(views, (list, tuple)) else views, cfg)
        x_t = to_device_images(views[1], cfg) if isinstance(views, (list, tuple)) else x_s
        with autocast:
            target = teacher.targets(x_t, index.to(cfg.device, non_blocking=True))
            pred = student(x_s)
        loss = regression_loss(pred, target)  # fp32, outside autocast
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()
        n_steps += 1
        n_images += x_s.shape[0]
        if n_steps % cfg.print_freq == 0:
            avg = loss_sum.item() / n_steps  # the only host sync, every print_freq steps
            check_finite(avg, epoch, n_steps)
            bar.set_postfix(loss=f"{avg:.4f}")
            log.info("epoch %d step %d/%d loss %.4f", epoch, n_steps, len(loader), avg)
    bar.close()
    totals = distributed.all_reduce_sum(
        torch.stack(
            [
                loss_sum.float(),
                torch.tensor(float(n_steps), device=cfg.device),
                torch.tensor(float(n_images), device=cfg.device),
            ]
        )
    )
    loss_avg = (totals[0] / totals[1].clamp(min=1)).item()
    check_finite(loss_avg, epoch, n_steps)
    seconds = time.perf_counter() - start
    return {"loss": loss_avg, "images_per_s": totals[2].item() / seconds, "steps": n_steps, "time_s": seconds}


def check_finite(loss: float, epoch: int, step: int) -> None:
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise UserError(
            f"the loss became {loss} in epoch {epoch} by step {step}; training stopped and the last good "
            "checkpoint is kept - lower --learning_rate or use --amp none"
        )


# ============ building blocks of main ============
def build_dataset(args, dist_info) -> IndexedImageFolder:
    train_dir = os.path.join(args.data, "train")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder '{args.data}' does not exist; give the dataset root as the first argument")
    if not os.path.isdir(train_dir):
        raise UserError(f"data folder '{args.data}' has no train/ sub-folder; expected <data>/train/<class>/<image>")
    classes = None
    if args.class_list:
        classes = read_class_list(args.class_list)
    elif args.dataset == "imagenet100":
        classes = imagenet100_classes(list_class_folders(train_dir))
    views = TrainViews(args.image_size, args.single_aug, args.weak_weak, args.weak_strong)
    dataset = IndexedImageFolder(train_dir, views, classes, seed=args.seed)
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


def build_teacher(args, device: torch.device):
    if args.use_cache or args.teacher_feats:
        raise UserError("--use_cache / --teacher_feats are not available yet in this version; use a live teacher")
    if not args.teacher_weights:
        raise UserError("no teacher given; pass --teacher_weights FILE (a MoCo, torchvision, ... checkpoint)")
    teacher = load_teacher(args.teacher_weights, args.arch_teacher, args.teacher_format).to(device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


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


# Arguments that define what is trained: a resumed run must agree on them.
IDENTITY_ARGS = ("arch_student", "n_mlp_layers", "image_size", "single_aug", "weak_weak", "weak_strong")


def resume(args, exp_dir: str, student: Student, optimizer, scaler) -> int:
    """Continue from ``--resume`` or the experiment's latest checkpoint; returns the first epoch to run."""
    if args.resume and args.weights:
        raise UserError("--weights and --resume were both given; --resume continues a run, --weights starts a new one")
    path = args.resume or checkpoint_paths(exp_dir)["latest"]
    if not args.resume and (args.no_resume or not os.path.exists(path)):
        if args.weights:
            init_student_weights(student, args.weights)
        return 1
    ckpt = load_training_checkpoint(path)
    old = ckpt["args"]
    diff = [f"{k}: {old.get(k)} -> {getattr(args, k)}" for k in IDENTITY_ARGS if old.get(k) != getattr(args, k)]
    if diff:
        raise UserError(
            f"checkpoint '{path}' belongs to a different run ({'; '.join(diff)}); "
            "use another --exp_dir or pass --no_resume"
        )
    if args.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {args.epochs} is below the epoch {ckpt['epoch']} already done in '{path}'")
    load_strict(student.encoder.backbone, ckpt["student"], path, "student backbone")
    load_strict(student.head, ckpt["head"], path, "student head")
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    log.info("resumed from %s after epoch %d", path, ckpt["epoch"])
    return ckpt["epoch"] + 1


def save_checkpoint(args, exp_dir: str, epoch: int, student: Student, optimizer, scaler) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "args": vars(args),
        "student": student.backbone_state_dict(),
        "head": student.head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    atomic_save(state, checkpoint_paths(exp_dir)["latest"])
    if epoch % args.save_freq == 0 or epoch == args.epochs:
        atomic_save(state, epoch_checkpoint_path(exp_dir, epoch))


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
    loader = build_loader(
        dataset,
        args.batch_size // dist_info.world_size,
        num_workers=args.num_workers,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=args.seed,
        pin_memory=dist_info.device.type == "cuda",
    )

    # ============ building teacher and student ============
    teacher = build_teacher(args, dist_info.device)
    student = Student(args.arch_student, teacher.feat_dim, args.n_mlp_layers).to(dist_info.device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=args.learning_rate, momentum=args.sgd_momentum, weight_decay=args.weight_decay
    )
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.amp == "fp16")
    start_epoch = resume(args, exp_dir, student, optimizer, scaler)
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
    cfg = StepConfig(
        dist_info.device, amp_dtype(args.amp, dist_info.device), args.channels_last, args.print_freq, dist_info.is_main
    )
    stats = {}
    knn_sets = monitor_datasets(args, dataset.classes) if args.knn_every else None
    for epoch in range(start_epoch, args.epochs + 1):
        lr = cosine_lr(args.learning_rate, epoch, args.epochs)
        set_lr(optimizer, lr)
        loader.sampler.set_epoch(epoch)
        stats = {"epoch": epoch, "lr": lr, **train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, cfg)}
        if knn_sets and (epoch % args.knn_every == 0 or epoch == args.epochs):  # the same k-NN as eval_knn.py
            per_rank = max(1, args.batch_size // dist_info.world_size)
            kw = dict(batch_size=per_rank, workers=args.num_workers, device=dist_info.device, amp_dtype=cfg.amp_dtype)
            stats.update(knn_monitor(student.encoder, knn_sets, **kw))
        if dist_info.is_main:
            save_checkpoint(args, exp_dir, epoch, student, optimizer, scaler)
            append_json_line(os.path.join(exp_dir, "logs", "train_log.jsonl"), stats)
            writer.add(
                {"train/loss": stats["loss"], "train/lr": lr, "train/images_per_s": stats["images_per_s"]}, epoch
            )
            writer.add({f"knn/{k[4:]}": v for k, v in stats.items() if k.startswith("knn_")}, epoch)
            log.info(
                "epoch %d/%d: loss %.4f, lr %.4g, %.0f images/s",
                epoch,
                args.epochs,
                stats["loss"],
                lr,
                stats["images_per_s"],
            )
        distributed.barrier()
    finish(exp_dir, student, dist_info.is_main)
    writer.close()
    distributed.cleanup()
    return stats


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
