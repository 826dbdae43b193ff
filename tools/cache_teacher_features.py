"""Build a teacher feature cache: one float16 row per training image (and view), in dataset order.

The paper's cached runs (SimCLR-x4, BYOL, SwAV teachers) regressed one fixed centre-crop feature per
image (Resize 256, CenterCrop 224, the teacher's own normalisation). One process:

    python -m tools.cache_teacher_features /path/to/imagenet --arch_teacher resnet50x4 \
        --teacher_weights simclr_r50x4.pth --out cache/simclr_r50x4_train.npy

All GPUs of a machine (rows still land in dataset order; an interrupted build resumes when rerun):

    torchrun --nproc_per_node=gpu -m tools.cache_teacher_features /path/to/imagenet ...same flags...

Then train with ``train_student.py ... --use_cache --teacher_feats cache/simclr_r50x4_train.npy``.

``--dense`` also stores the dense targets of ``--loss dense/both`` (the teacher's map: a ViT's final-norm
patch tokens, a CNN's last feature map) in ``FILE.dense.npy``, float16, h x w x C values per image and
view (a ViT-S/16 at 224 px: 14 x 14 x 384 x 2 bytes = 150,528), or resampled to a coarser ``--cache_grid G``
(G = 7: 37,632 bytes); see docs/dense.md.

``--views K`` instead stores, for every image and v = 1..K, the teacher's feature of exactly the crop
the training loader gives that image in epoch v; give it training's ``--seed``, ``--image_size``,
view flags and ``--decode`` (training refuses a cache whose crops are not its own):

    python -m tools.cache_teacher_features /path/to/imagenet --teacher_weights moco_v2_800ep_pretrain.pth.tar \
        --views 10 --single_aug --weak_weak --image_size 224 --seed 0 --out cache/moco_10views.npy
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

import torch

from data.datasets import IndexedImages
from data.sources import check_data, open_images
from data.sources import describe as describe_data
from data.transforms import PAPER_MIN_SCALE, CenterCrop, TeacherView, training_views
from models.backbones import teacher_arch_names
from models.errors import UserError
from models.io import file_sha256
from models.teachers import load_teacher
from tools.engine import cli, distributed
from tools.engine.logs import setup_logging
from tools.engine.step import AMP_CHOICES, amp_dtype
from tools.teacher_cache.builder import DenseSpec, build_cache

log = logging.getLogger("simreg.cache")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("teacher feature cache", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("data", help="the training images, given as to train_student.py (a dataset root, a folder of "
                   "images or shards)")  # fmt: skip
    cli.add_dataset_args(g, "cache")
    cli.add_layout_arg(g)
    g.add_argument("--resize_size", type=cli.image_size_int, default=256, help="shorter side before the centre crop")
    g.add_argument("--crop_size", type=cli.image_size_int, default=224, help="centre crop size (the cached view)")
    g.add_argument(
        "--views",
        type=cli.nonneg_int,
        default=0,
        help="0: one centre crop per image (the paper's cached mode); K: the training crops of epochs 1..K",
    )
    cli.add_view_args(g)  # with --views K: the run's views, as train_student.py takes them
    g.add_argument("--batch_size", type=cli.positive_int, default=256, help="rows (crops) per batch and process")
    cli.add_workers_arg(g, "num_workers")
    g = p.add_argument_group("teacher")
    cli.add_teacher_args(g, teacher_arch_names(), weights_required=True)
    g.add_argument("--dense", action="store_true",
                   help="also store the dense targets of train_student.py --loss dense/both (the teacher's feature "
                        "map, a ViT's patch tokens) in FILE.dense.npy, float16")  # fmt: skip
    g.add_argument("--dense_blocks", type=cli.positive_int, default=1,
                   help="with --dense, ViT teachers: the last N blocks' normalised tokens, concatenated")  # fmt: skip
    g.add_argument("--cache_grid", type=cli.positive_int, default=None,
                   help="with --dense: store the maps resampled to G x G (coarser than the teacher's grid: G^2 / "
                        "grid^2 of the size); best G = the student's grid, where the loss compares them")  # fmt: skip
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", required=True, help="output FILE.npy (FILE.json manifest is written beside it)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished cache built with other settings")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast of the teacher, as train_student.py's --amp: auto = bf16 on CUDA (the targets a "
                   "live teacher gives there), fp32 on CPU")  # fmt: skip
    cli.add_runtime_args(g)  # --seed: with --views K, the training run's seed (its crops)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Paths and sizes, before any work starts."""
    cli.check_npy_output(args.out, args.crop_size, args.resize_size)
    view_flags = (
        args.single_aug or args.weak_weak or args.weak_strong or args.no_flip or args.min_crop_scale != PAPER_MIN_SCALE
    )
    if not args.views and view_flags:
        cli.note_ignored("--single_aug/--weak_weak/--weak_strong/--min_crop_scale/--no_flip", "they choose the "
                         "crops of --views K; without it the cache holds centre crops")  # fmt: skip
    if not args.dense and (args.cache_grid is not None or args.dense_blocks != 1):
        raise UserError("--cache_grid and --dense_blocks describe the dense targets; add --dense, or drop them")
    check_data(args.data)
    cli.check_paths(weights={"--teacher_weights": args.teacher_weights}, files={"--class_list": args.class_list})
    cli.check_batch_fits(args.batch_size, args.image_size if args.views else args.crop_size)


def build_dataset(args, device: torch.device) -> IndexedImages:
    """The training images in train_student.py's order and class subset: uint8 centre crops, or with
    ``--views`` the teacher's view of the training transform (key ``(index, v)``: its crop in epoch v)."""
    dataset = open_images(args.data, class_list=args.class_list, subset=args.dataset, layout=args.layout,
                          seed=args.seed)  # fmt: skip
    if args.views:  # the decoder chosen as training chooses it, so the crops (and the record) are the run's
        views = training_views(args.image_size, args.single_aug, args.weak_weak, args.weak_strong, args.decode,
                               device, dataset.index.name_sample(), args.min_crop_scale, not args.no_flip)  # fmt: skip
        dataset.transform = TeacherView(views)
    else:
        dataset.transform = CenterCrop(args.resize_size, args.crop_size)
    return dataset


def describe(args, teacher, dataset: IndexedImages, is_main: bool) -> dict:
    """The manifest's teacher, preprocessing and views sections (the fingerprint and shape come later)."""
    sha = file_sha256(args.teacher_weights) if is_main else ""
    teacher_id = {"arch": teacher.arch, "format": teacher.fmt, "use_fc": args.teacher_fc, "pool": teacher.pool,
                  "weights_sha256": sha}  # fmt: skip
    norms = {"imagenet": "ImageNet mean/std", "none": "none ([0, 1] pixels)"}
    preprocessing = {
        "input": "uint8 / 255, then the teacher's normalisation",
        "normalisation": norms.get(teacher.input_norm, teacher.input_norm),
    }
    if args.views:
        views = {**dataset.transform.views.record(args.seed), "n_views": args.views}
        preprocessing["crops"] = "the training loader's: view v of image i is its crop in epoch v"
    else:
        views = {"mode": "centre crop", "n_views": 1}
        preprocessing.update(resize_size=args.resize_size, crop_size=args.crop_size, interpolation="bilinear")
    files = {"weights_file": os.path.abspath(args.teacher_weights), "data_root": os.path.abspath(dataset.root)}
    return {"teacher": teacher_id, "preprocessing": preprocessing, "views": views, **files}


def dense_spec(args, teacher, n_rows: int) -> DenseSpec | None:
    """With ``--dense``: the teacher set to give its maps, what is stored (grid, channels), and a refusal when
    ``--cache_grid`` is finer than the teacher's grid or the file would not fit on the disk."""
    if not args.dense:
        return None
    size = args.image_size if args.views else args.crop_size
    teacher.use_objective("both", args.dense_blocks, size)
    grid = teacher.dense_grid if args.cache_grid is None else (args.cache_grid, args.cache_grid)
    if grid[0] > teacher.dense_grid[0] or grid[1] > teacher.dense_grid[1]:
        h, w = teacher.dense_grid
        raise UserError(f"--cache_grid {args.cache_grid} is finer than the teacher's {h}x{w} grid at {size} px; "
                        f"choose at most {min(h, w)} (or leave it unset to store the teacher's grid)")  # fmt: skip
    spec = DenseSpec(args.dense_blocks, teacher.dense_dim, tuple(teacher.dense_grid), tuple(grid), teacher.tap.kind)
    need, folder = n_rows * 2 * spec.row_width, os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    log.info("dense targets: %d x %d x %d float16 = %d bytes per image and view, %.2f GiB for %d rows",
             grid[0], grid[1], spec.channels, 2 * spec.row_width, need / 2**30, n_rows)  # fmt: skip
    if need > free:
        raise UserError(f"the dense targets need {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                        f"'{folder}'; choose a coarser --cache_grid or another --out")  # fmt: skip
    return spec


def main(args: argparse.Namespace) -> None:
    dist_info = distributed.init_distributed(args.device)
    setup_logging(None, dist_info.is_main, args.debug)
    check_args(args)
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ============ data and teacher ============
    dataset = build_dataset(args, dist_info.device)
    teacher = load_teacher(
        args.teacher_weights,
        args.arch_teacher,
        args.teacher_format,
        use_fc=args.teacher_fc,
        pool=args.teacher_pool,
        input_size=args.image_size if args.views else args.crop_size,
    )
    teacher = teacher.to(dist_info.device)
    what = f"{args.views} views ({dataset.transform.views.name}, seed {args.seed})" if args.views else "centre crops"
    log.info("caching %s of %s", what, describe_data(dataset))
    manifest = describe(args, teacher, dataset, dist_info.is_main)
    dense = dense_spec(args, teacher, len(dataset) * max(args.views, 1))

    # ============ extraction ============
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    build_cache(
        teacher,
        dataset,
        args.out,
        manifest,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        dist_info=dist_info,
        overwrite=args.overwrite,
        n_views=args.views,
        dense=dense,
        amp=amp_dtype(args.amp, dist_info.device),
    )
    distributed.barrier()
    distributed.cleanup()


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
