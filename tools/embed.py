"""Features of every image of a folder, with the evaluation's preprocessing: one row per file.

Any layout (the folder is walked recursively, files sorted by relative path), any checkpoint the
evaluation scripts read (a training checkpoint, an exported backbone, a released student, a teacher):

    python -m tools.embed /path/to/images --weights exp/r18/checkpoints/student_backbone.pth --out feats.npy

All GPUs of a machine share the work (rows still land in file order):

    torchrun --nproc_per_node=gpu -m tools.embed /path/to/images --weights ... --out feats.npy

``feats.npy`` is float16 (N, D), row i for the i-th file of ``feats.json`` (``files``), which also
records the network and the preprocessing. An interrupted run resumes when rerun: only the missing
rows are computed.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from torch import nn

from data.image_files import ImageFiles, list_image_files
from data.transforms import CenterCrop
from models.errors import UserError
from models.formats import FORMATS
from models.pretrained import EvalModel, load_eval_model
from tools.engine import cli, distributed
from tools.engine.logs import setup_logging
from tools.engine.step import amp_dtype, autocast
from tools.eval.common import add_size_args, prediction, resolve_sizes
from tools.teacher_cache.builder import build_cache
from tools.teacher_cache.reader import manifest_path

log = logging.getLogger("simreg.embed")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("features of every image of a folder", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("data", metavar="DIR", help="folder of images in any layout (searched recursively)")
    add_size_args(g)
    g.add_argument("-b", "--batch_size", type=cli.positive_int, default=256, help="images per batch and process")
    cli.add_workers_arg(g, "workers")
    g = p.add_argument_group("network")
    g.add_argument("--weights", required=True, help="checkpoint (any student or teacher format eval_knn.py reads)")
    g.add_argument("-a", "--arch", default=None, help="architecture; default: read from the checkpoint")
    g.add_argument("--format", default="auto", help=f"checkpoint layout: {', '.join(['auto', *FORMATS])}")
    g.add_argument("--teacher", action="store_true", help="load --weights as a teacher (any teacher format)")
    g.add_argument("--use_pred", action="store_true", help="the prediction head's output instead of the backbone's")
    g.add_argument("--head", type=cli.positive_int, default=1, help="with --use_pred: the head of teacher K (1-based)")
    cli.add_pool_arg(g)
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out", required=True, help="output FILE.npy (FILE.json with the file list is written beside it)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished FILE.npy made with other settings")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto = bf16 on CUDA, as eval")
    cli.add_runtime_args(g, seed=False)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Paths and the sizes given, before any work starts (the defaults come from the checkpoint)."""
    cli.check_npy_output(args.out, args.crop_size, args.resize_size)
    if not os.path.isdir(args.data):
        what = "is a file" if os.path.exists(args.data) else "does not exist"
        raise UserError(f"image folder '{args.data}' {what}; give the folder holding the images")
    cli.check_paths(weights={"--weights": args.weights})


class Autocast(nn.Module):
    """``model`` under autocast at ``dtype`` (None: float32), as the evaluation scripts run it."""

    def __init__(self, model: EvalModel, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model, device, dtype
        self.feat_dim = model.feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, D) float32
        with autocast(self.device, self.dtype):
            return self.model(x).float()


def describe(model: EvalModel, args: argparse.Namespace, dtype: torch.dtype | None) -> dict:
    """What the rows depend on (a resumed run must agree on all of it), in the feature file's manifest."""
    ident = model.identity
    network = {k: ident.get(k) for k in ("kind", "arch", "format", "use_pred", "weights_sha256", "pool") if k in ident}
    return {
        "teacher": network,  # the cache format's name for the network that made the rows
        "preprocessing": {
            "resize_size": args.resize_size,
            "crop_size": args.crop_size,
            "interpolation": "bilinear",
            "input": "uint8 / 255, then the network's own normalisation",
            "autocast": str(dtype or "float32"),
        },
        "weights_file": os.path.abspath(args.weights),
        "data_root": os.path.abspath(args.data),
    }


def main(args: argparse.Namespace) -> None:
    dist_info = distributed.init_distributed(args.device)
    setup_logging(None, dist_info.is_main, args.debug)
    check_args(args)
    use_pred = prediction(args)  # --use_pred --head K, as the evaluation scripts read them
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ============ the images and the network ============
    files = list_image_files(args.data)
    model = load_eval_model(args.weights, args.arch, args.format, use_pred, args.teacher, args.teacher_pool)
    resolve_sizes(args, model)  # the flags, else what the checkpoint was trained at
    cli.check_batch_fits(args.batch_size, args.crop_size)
    dataset = ImageFiles(args.data, files, CenterCrop(args.resize_size, args.crop_size))
    dtype = amp_dtype(args.amp, dist_info.device)
    log.info("embedding %d images under %s with %s (%d-d)", len(files), args.data, model.arch, model.feat_dim)

    # ============ features, resumable, rows in file order ============
    manifest = {**describe(model, args, dtype), "files": files}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    build_cache(
        Autocast(model.to(dist_info.device), dist_info.device, dtype),
        dataset,
        args.out,
        manifest,
        batch_size=args.batch_size,
        num_workers=args.workers,
        dist_info=dist_info,
        overwrite=args.overwrite,
        desc="embedding",
    )
    if dist_info.is_main:
        log.info("features: %s (float16, %d rows), file list: %s", args.out, len(files), manifest_path(args.out))
    distributed.barrier()
    distributed.cleanup()


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
