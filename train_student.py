"""SimReg distillation: a student (backbone + prediction MLP) regresses a frozen teacher's features.

One process (CPU or one GPU):
    python train_student.py /path/to/imagenet --arch_teacher resnet50 --arch_student resnet18 \
        --teacher_weights moco_v2_800ep_pretrain.pth.tar --single_aug --weak_weak --exp_dir exp/r18

All GPUs of one machine (``--batch_size`` is the global batch, split across the processes):
    torchrun --nproc_per_node=gpu train_student.py /path/to/imagenet ...same flags...

Several machines: the same command on each node with ``--nnodes N --node_rank R
--rdzv_backend c10d --rdzv_endpoint HOST:PORT``; under SLURM, ``srun torchrun ...`` (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.datasets import IndexedImages, dataset_fingerprint
from data.device_decode import describe
from data.loaders import build_loader
from data.prefetch import DevicePrefetcher
from data.sources import check_data, open_images
from data.sources import describe as describe_data
from data.transforms import training_views
from models.backbones import canonical_arch, teacher_arch_names
from models.errors import UserError
from models.io import write_json
from models.simreg import HEAD_LAYERS, Student, loss_names
from tools.engine import cli, distributed
from tools.engine.cli import nonneg_float, nonneg_int, positive_int
from tools.engine.epoch_log import RunClock, loads_into, log_epoch, log_step
from tools.engine.logs import ScalarWriter, attach_log_file, setup_logging
from tools.engine.meters import EpochProgress, Meters, StopVote
from tools.engine.run_state import Run, export_backbone, resume, run_identity, save_checkpoint, teacher_fingerprint
from tools.engine.run_teachers import (
    TeacherSpec,
    build_teachers,
    loss_weights,
    members,
    objective_settings,
    teacher_specs,
    view_period,
)
from tools.engine.schedules import cosine_lr, set_lr
from tools.engine.signals import Interrupted, StopRequest
from tools.engine.step import (
    AMP_CHOICES,
    StepConfig,
    amp_dtype,
    build_optimizer,
    channels_last_default,
    default_dtype,
    distill_step,
)
from tools.engine.sync_bn import convert_sync_batchnorm
from tools.eval.monitor import check_monitor_data, knn_monitor, monitor_sets

log = logging.getLogger("simreg.train")


# ============ flags ============
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.DataLastParser("SimReg distillation", add_help=add_help)
    add_data_args(p.add_argument_group("data"))
    add_model_args(p.add_argument_group("model"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=130)
    g.add_argument("--batch_size", type=positive_int, default=256, help="GLOBAL batch size, split across processes")
    g.add_argument("--learning_rate", type=nonneg_float, default=0.05)
    g.add_argument("--weight_decay", type=nonneg_float, default=1e-4)
    g.add_argument("--sgd_momentum", type=cli.momentum_float, default=0.9)
    add_runtime_args(p.add_argument_group("runtime"))
    return p


def add_data_args(g) -> None:
    g.add_argument("data", nargs="?", help="training images: a dataset root holding train/ (and val/), any folder "
                   "of images (class folders or not), or shards 'DIR/train-{000000..000099}.tar'")  # fmt: skip
    cli.add_dataset_args(g)
    cli.add_layout_arg(g)
    cli.add_view_args(g)
    cli.add_workers_arg(g, "num_workers", what="per rank")
    g.add_argument("--skip_bad_images", action="store_true", help="replace unreadable images by the next readable one")


def add_model_args(g) -> None:
    cli.add_teacher_args(g, teacher_arch_names(), several=True)
    g.add_argument("--teacher_loss_weights", nargs="+", action=cli.OneOrMany, default=None,
                   help="several teachers: the loss weights (normalised to sum 1; default equal)")  # fmt: skip
    g.add_argument("--arch_student", default="resnet18", help="a torchvision classification model or timm/<name>")
    g.add_argument("--n_mlp_layers", type=int, default=4, choices=HEAD_LAYERS, help="prediction head depth")
    cli.add_objective_args(g)
    g.add_argument("--linear_pred", action="store_true", help="alias of --n_mlp_layers 0 (linear predictor)")
    g.add_argument("--use_cache", action="store_true", help="regress cached teacher features (no teacher network)")
    g.add_argument("--teacher_feats", nargs="+", action=cli.OneOrMany, default=None,
                   help="teacher feature cache FILE.npy, one per teacher ('-': that one runs live)")  # fmt: skip
    g.add_argument("--cache_on_device", action="store_true", help="with --use_cache: copy the cache to the device")
    g.add_argument("--mse_nonorm", action="store_true", help="original flag; no effect (the loss is the same)")
    g.add_argument("--sync_bn", action="store_true",
                   help="BatchNorm statistics over the whole global batch instead of each process's share (default: "
                   "per process, as the original's DataParallel; useful when few images per GPU remain)")  # fmt: skip


def add_runtime_args(g) -> None:
    g.add_argument("--exp_dir", default=None, help="experiment folder (default: <base_dir>/exp/<exp>)")
    g.add_argument("--base_dir", default="./", help="experiment root (original flag)")
    g.add_argument("--exp", default="simreg", help="experiment name under <base_dir>/exp (original flag)")
    g.add_argument("--resume", default="", help="continue a run from this training checkpoint")
    g.add_argument("--restart", action="store_true", help="original flag: with --resume, its weights but a new run")
    g.add_argument("--no_resume", action="store_true", help="do not resume from the experiment's latest checkpoint")
    g.add_argument("--weights", default=None, help="initialise the student from this checkpoint, start at epoch 1")
    g.add_argument("--save_freq", type=positive_int, default=10, help="keep ckpt_epoch_<N>.pth every N epochs")
    g.add_argument("--print_freq", type=positive_int, default=100, help="log the loss every N steps")
    g.add_argument("--ckpt_every_steps", type=nonneg_int, default=0, help="also checkpoint every N steps")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="autocast; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--channels_last", action="store_const", const=True, default=None,
                   help="NHWC memory layout for both networks (default: on with CUDA and bf16/fp16)")  # fmt: skip
    g.add_argument("--no_channels_last", dest="channels_last", action="store_const", const=False,
                   help="keep NCHW even on CUDA with autocast")  # fmt: skip
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--compile_teacher", action="store_true", help="torch.compile the teacher (BatchNorm folded first)")
    g.add_argument("--float64", action="store_true",
                   help="both networks and the loss in float64 (slow; numerical checks: rounding then stays far below "
                        "any tolerance, whatever the CPU's kernels)")  # fmt: skip
    g.add_argument("--knn_every", type=nonneg_int, default=0, help="every N epochs (and the last) log k-NN on val/")
    g.add_argument("--knn_resize_size", type=nonneg_int, default=0, help="k-NN resize (0: image_size * 256/224)")
    g.add_argument("--val_data", default=None, help="the k-NN monitor's labelled data: a root holding train/ and val/ "
                   "in class folders (default: DATA's own, when its images are class folders)")  # fmt: skip
    cli.add_runtime_args(g)


def check_args(args: argparse.Namespace, world_size: int) -> list[TeacherSpec]:
    """Everything about the flags that parsing alone cannot tell, before any work starts."""
    if args.mse_nonorm:
        cli.note_ignored("--mse_nonorm", "both vectors are L2-normalised, so the loss is the same")
    if args.restart:  # the original's --resume X --restart: X's weights, a fresh optimizer, epoch 1
        if not args.resume:
            raise UserError("--restart restarts from the weights of --resume FILE; give --resume too")
        log.info("--restart: starting a new run from the weights of %s (as --weights)", args.resume)
        args.weights, args.resume = args.resume, ""
    if args.float64 and args.amp in ("bf16", "fp16"):
        raise UserError(f"--float64 runs without autocast; drop --amp {args.amp} (or --float64)")
    if args.batch_size % world_size:
        raise UserError(
            f"--batch_size {args.batch_size} (global) does not divide across {world_size} "
            "processes; choose a multiple of the process count"
        )
    check_data(args.data)
    check_monitor_data(args.val_data, args.knn_every)
    specs = teacher_specs(args.teacher_weights, args.arch_teacher, args.teacher_format, args.teacher_fc,
                          args.teacher_feats, args.use_cache, args.teacher_pool)  # fmt: skip
    args.teacher_loss_weights = loss_weights(args.teacher_loss_weights, len(specs))
    args.dense_weight, args.dense_blocks = objective_settings(args.loss, args.dense_weight, args.dense_blocks,
                                                              specs)  # fmt: skip
    cli.check_paths(files={"--class_list": args.class_list, "--resume": args.resume, "--weights": args.weights})
    cli.check_batch_fits(args.batch_size // world_size, args.image_size)
    return specs


# ============ one epoch ============
def train_one_epoch(
    student, teacher, loader, optimizer, scaler, epoch: int, cfg: StepConfig, progress=None, on_checkpoint=None,
    on_print=None,
) -> dict:  # fmt: skip
    """One pass over ``loader`` (the rest of it when ``progress`` resumes a partial epoch).

    ``teacher.targets(images, indices)`` gives the regression targets (B, D). Batch t + 1 is made ready
    on the device (decoded, copied, a cached teacher's rows read) by a background thread while step t
    is queued (:class:`data.prefetch.DevicePrefetcher`). The loss is summed on the device and read back
    only every ``print_freq`` steps (and at checkpoints), so steps do not wait for the host.
    ``on_checkpoint(epoch, EpochProgress)`` is called every ``cfg.ckpt_every_steps`` steps and when the
    ranks agree to stop on a signal (then :class:`Interrupted` is raised); ``on_print(epoch, step, steps in
    the epoch, mean loss since the last logged step)`` at every logged step. Returns the epoch's mean loss
    over all ranks and its throughput.
    """
    progress = progress or EpochProgress()
    student.train()
    is_main = cfg.dist_info.is_main
    meters = Meters(cfg.device, progress if is_main else EpochProgress(step=progress.step), cfg.loss_names)
    batches = iter(DevicePrefetcher(loader, cfg.device, getattr(teacher, "read_ahead", None)))
    bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch}", disable=None if is_main else True, leave=False,
               dynamic_ncols=True)  # fmt: skip
    summed = progress.loss_sum[0] if isinstance(progress.loss_sum, list) else progress.loss_sum
    logged = (progress.step, summed)  # (step, loss sum) at the last logged step
    try:
        for views, _, index in bar:
            loss = distill_step(student, teacher, views, index, optimizer, scaler, cfg)
            meters.update(loss, index.shape[0])
            at_print = meters.step % cfg.print_freq == 0
            if at_print:
                avg = meters.check(epoch)  # host sync, every print_freq steps only
                bar.set_postfix(loss=f"{avg:.4f}")
                log.info("epoch %d step %d/%d loss %.4f", epoch, meters.step, progress.step + len(loader), avg)
                if on_print and meters.step > logged[0]:
                    on_print(epoch, meters.step, progress.step + len(loader), (avg * meters.step - logged[1]) /
                             (meters.step - logged[0]))  # fmt: skip
                logged = (meters.step, avg * meters.step)
            at_ckpt = bool(cfg.ckpt_every_steps) and meters.step % cfg.ckpt_every_steps == 0
            stop = cfg.stop() if cfg.stop else False
            if on_checkpoint and (stop or at_ckpt):
                meters.check(epoch)  # never save weights that have gone NaN
                on_checkpoint(epoch, meters.reduced())
            if stop:
                cfg.stop.close()
                raise Interrupted(f"stopped by {cfg.stop.name} in epoch {epoch} after step {meters.step}",
                                  cfg.stop.exit_status)  # fmt: skip
    finally:
        batches.close()  # a loop left early (a stop signal, an error) stops the prefetch thread too
    bar.close()
    return meters.summary(epoch)


# ============ building blocks of main ============
def build_dataset(args, device: torch.device) -> IndexedImages:
    dataset = open_images(args.data, class_list=args.class_list, subset=args.dataset, layout=args.layout,
                          seed=args.seed, skip_bad=args.skip_bad_images, skip_flag="--skip_bad_images")  # fmt: skip
    views = training_views(args.image_size, args.single_aug, args.weak_weak, args.weak_strong, args.decode, device,
                           dataset.index.name_sample(), args.min_crop_scale, not args.no_flip)  # fmt: skip
    dataset.transform = views
    log.info("data: %s; %s, %d px; %s", describe_data(dataset), views.name, args.image_size,
             describe(views.decoder, device))  # fmt: skip
    if len(dataset) < args.batch_size:
        raise UserError(f"the training set has {len(dataset)} images, fewer than --batch_size {args.batch_size}")
    return dataset


def build_run(args, exp_dir: str, dataset, teacher, specs: list[TeacherSpec], dist_info) -> Run:
    """Student (one head per teacher), optimizer and scaler, with the run's identity (what resuming must agree on)."""
    teachers = members(teacher)
    dims = teachers[0].feat_dim if len(teachers) == 1 else [t.feat_dim for t in teachers]
    with default_dtype(compute_dtype(args)):
        student = Student(args.arch_student, dims, args.n_mlp_layers, args.loss, [t.dense_dim for t in teachers],
                          args.image_size).to(dist_info.device, compute_dtype(args))  # fmt: skip
    if args.sync_bn:
        if not dist_info.distributed:
            log.info("--sync_bn: one process, so its BatchNorm statistics are the whole batch's anyway")
        student = convert_sync_batchnorm(student)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        student.parameters(), args.learning_rate, args.sgd_momentum, args.weight_decay, dist_info.device
    )
    scaler = torch.amp.GradScaler(dist_info.device.type, enabled=args.amp == "fp16")
    student_id = {"arch_student": args.arch_student, "n_mlp_layers": args.n_mlp_layers,
                  "image_size": args.image_size, "views": dataset.transform.name}  # fmt: skip
    if args.float64:  # only when set, so float32 runs keep the identities they were recorded with
        student_id["float64"] = True
    if args.loss != "global":  # likewise: a global run's identity is the one it always had
        student_id.update(loss=args.loss, dense_blocks=args.dense_blocks)
        if args.loss == "both":
            student_id["dense_weight"] = args.dense_weight
    if args.sync_bn:  # another normalisation: resuming must not switch it on or off
        student_id["sync_bn"] = True
    ids = [teacher_fingerprint(t, spec.weights, spec.use_fc) for t, spec in zip(teachers, specs, strict=True)]
    if len(ids) > 1:  # every teacher, in order, and how their losses are weighted
        student_id["teacher_loss_weights"] = teacher.weights
    identity = run_identity(dataset_fingerprint(dataset), ids[0] if len(ids) == 1 else ids, student_id)
    return Run(exp_dir, student, optimizer, scaler, identity, vars(args), args.epochs, args.save_freq,
               dist_info.is_main)  # fmt: skip


def compute_dtype(args) -> torch.dtype:
    """The networks' precision: float32, or float64 with ``--float64``."""
    return torch.float64 if args.float64 else torch.float32


def wrap_model(student: Student, args, dist_info) -> torch.nn.Module:
    """DDP around the trainable part only (the teacher stays a plain module), then torch.compile."""
    model = student
    if dist_info.distributed:
        model = DistributedDataParallel(
            student, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None
        )
    return torch.compile(model) if args.compile else model


def main(args: argparse.Namespace) -> dict:
    if args.linear_pred:
        args.n_mlp_layers = 0  # the original's flag for the linear predictor
    args.arch_student = canonical_arch(args.arch_student)
    dist_info = distributed.init_distributed(args.device)
    exp_dir = cli.resolve_exp_dir(args.exp_dir, args.base_dir, args.exp)
    setup_logging(None, dist_info.is_main, args.debug)  # logs/train.log once the run is set up
    specs = check_args(args, dist_info.world_size)
    torch.manual_seed(args.seed)
    amp = None if args.float64 else amp_dtype(args.amp, dist_info.device)
    args.channels_last = channels_last_default(args.channels_last, dist_info.device, amp)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ============ preparing data ============
    dataset = build_dataset(args, dist_info.device)
    loader = build_loader(dataset, args.batch_size // dist_info.world_size, num_workers=args.num_workers,
                          rank=dist_info.rank, world_size=dist_info.world_size, seed=args.seed,
                          pin_memory=dist_info.device.type == "cuda")  # fmt: skip
    knn_sets = monitor_sets(
        args.data, args.val_data, args.knn_every, args.image_size, args.knn_resize_size, dataset
    )  # centre-crop train/ and val/, as eval_knn.py reads them

    # ============ building teacher and student ============
    teacher = build_teachers(specs, dist_info.device, dataset_fingerprint(dataset), args.teacher_loss_weights,
                             channels_last=args.channels_last, compile_teacher=args.compile_teacher,
                             cache_on_device=args.cache_on_device, image_size=args.image_size,
                             views=dataset.transform.record(args.seed), epochs=args.epochs,
                             dtype=compute_dtype(args), amp=amp, objective=args.loss,
                             dense_blocks=args.dense_blocks)  # fmt: skip
    dataset.epoch_period = view_period(teacher)  # the loader's crops repeat with a K-view cache's K views
    run = build_run(args, exp_dir, dataset, teacher, specs, dist_info)
    start_epoch, progress = resume(run, args.resume, args.no_resume, args.weights)
    model = wrap_model(run.student, args, dist_info)

    # ============ training ============
    attach_log_file(os.path.join(exp_dir, "logs", "train.log"), dist_info.is_main)  # the lines so far included
    if dist_info.is_main:
        write_json(os.path.join(exp_dir, "logs", "train_args.json"), vars(args))
    cfg = StepConfig(dist_info, amp, args.channels_last, args.print_freq, args.ckpt_every_steps,
                     StopVote(StopRequest(dist_info.is_main).install(), dist_info), compute_dtype(args),
                     args.dense_weight or 1.0, loss_names(len(members(teacher)), args.loss))  # fmt: skip
    stats = train(args, run, model, teacher, loader, cfg, start_epoch, progress, knn_sets)
    if not stats.get("interrupted"):
        finish(run)
    distributed.cleanup()
    if stats.get("interrupted"):
        sys.exit(stats["exit_status"])  # 0 after a preemption signal, 130 after Ctrl-C
    return stats


def train(args, run: Run, model, teacher, loader, cfg: StepConfig, start_epoch: int, progress, knn_sets) -> dict:
    """The epochs from ``start_epoch`` on; returns the last epoch's statistics (``interrupted`` on a signal)."""
    writer = ScalarWriter(os.path.join(run.exp_dir, "logs") if run.is_main else None)
    per_rank_batch = loader.batch_size
    stats, clock = {}, RunClock(start_epoch, args.epochs)
    on_print = partial(log_step, writer) if run.is_main else None
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            lr = cosine_lr(args.learning_rate, epoch, args.epochs)
            set_lr(run.optimizer, lr)
            loader.sampler.set_epoch(epoch, start=progress.step * per_rank_batch)
            teacher.set_epoch(epoch)  # a K-view cache serves this epoch's view; a live teacher ignores it
            on_ckpt = partial(save_checkpoint, run)
            stats = train_one_epoch(model, teacher, loader, run.optimizer, run.scaler, epoch, cfg, progress, on_ckpt,
                                    on_print)  # fmt: skip
            stats = {"epoch": epoch, "lr": lr, **stats, "bad_images_skipped": loader.dataset.bad_images_seen()}
            stats.update(loader.dataset.transform.decode_stats())
            progress = EpochProgress()
            if knn_sets and (epoch % args.knn_every == 0 or epoch == args.epochs):
                stats.update(knn_monitor(run.student.encoder, knn_sets, batch_size=per_rank_batch,
                                         workers=args.num_workers, dist_info=cfg.dist_info,
                                         amp_dtype=cfg.amp_dtype))  # fmt: skip
            save_checkpoint(run, epoch)
            log_epoch(run, writer, stats, clock.epoch_done(epoch))
            distributed.barrier()
    except Interrupted as exc:
        if run.is_main:
            log.warning("%s; checkpoint saved in %s - rerun the same command to resume", exc, run.exp_dir)
        return {"interrupted": True, "exit_status": exc.exit_status, **stats}
    finally:
        cfg.stop.close()
        cfg.stop.stop.uninstall()
        writer.close()
    return stats


def finish(run: Run) -> None:
    export = export_backbone(run)
    if run.is_main:
        log.info("done. checkpoints: %s", os.path.join(run.exp_dir, "checkpoints"))
        log.info("logs (train.log, train_log.jsonl, TensorBoard): %s", os.path.join(run.exp_dir, "logs"))
        log.info("exported backbone (%s): %s", loads_into(run.student.arch), export)


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
