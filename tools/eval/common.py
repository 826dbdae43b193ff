"""What ``eval_knn.py`` and ``eval_linear.py`` share: flags, the network to evaluate, the data and
the centre-crop features (computed once per checkpoint, reused only while they are provably current).

This module sits at the command-line boundary (like ``tools/engine/cli.py``): the ``*_from_args`` helpers
read the parsed flags; everything they call takes plain values.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass

import torch

from data.datasets import (
    DataError,
    dataset_fingerprint,
    list_class_folders,
    scan_class_folders,
    select_classes,
    split_folder,
)
from models.errors import UserError
from models.formats import FORMATS
from models.io import read_json
from models.pretrained import EvalModel, load_eval_model, random_init_model
from tools.engine import cli, distributed
from tools.engine.checkpoint import LATEST, epoch_checkpoint_path
from tools.engine.distributed import DistInfo
from tools.engine.logs import attach_log_file, setup_logging
from tools.engine.step import amp_dtype
from tools.eval.features import FeatureStore, build_eval_dataset, extract_features

log = logging.getLogger(__name__)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags of both evaluation scripts (the original's names first, ours after)."""
    g = p.add_argument_group("data")
    g.add_argument("data", metavar="DIR", help="dataset root holding train/ and val/ in ImageFolder layout")
    cli.add_dataset_args(g, "evaluate on")
    add_size_args(g, "centre (and linear training) crop size")
    cli.add_workers_arg(g, "workers", what="per rank")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=cli.positive_int, default=256, help="GLOBAL batch")

    g = p.add_argument_group("network")
    add_network_args(g)
    g.add_argument("--use_pred", action="store_true", help="evaluate the prediction head's output")
    g.add_argument("--head", type=cli.positive_int, default=1, help="with --use_pred: the head of teacher K (1-based)")
    g.add_argument("--linear_pred", action="store_true", help="original flag; the head layout is read from the file")
    cli.add_pool_arg(g)

    g = p.add_argument_group("output and runtime")
    g.add_argument("--exp_dir", default=None, help="experiment folder (checkpoints/, features/, linear/)")
    g.add_argument("--save", default=None, help="output folder (original flag); default under --exp_dir")
    g.add_argument("--epoch", type=cli.nonneg_int, default=None, help="checkpoint epoch: picks ckpt_epoch_<N>.pth")
    g.add_argument("--no_save_features", action="store_true", help="do not keep the float16 features")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto = bf16 on CUDA")
    cli.add_runtime_args(g)


def add_network_args(g: argparse._ArgumentGroup) -> None:
    """Which network an evaluation reads: ``--arch``, ``--weights`` (``--format``, ``--teacher``), ``--random_init``."""
    g.add_argument("-a", "--arch", default=None, help="architecture; default: read from the checkpoint")
    g.add_argument("--weights", default=None, help="checkpoint to evaluate (any student or teacher format)")
    g.add_argument("--format", default="auto", help=f"checkpoint layout: {', '.join(['auto', *FORMATS])}")
    g.add_argument("--teacher", action="store_true", help="load --weights as a teacher (load_teacher, any format)")
    g.add_argument("--random_init", action="store_true", help="evaluate --arch at random initialisation")


def add_size_args(g: argparse._ArgumentGroup, crop_help: str = "centre crop size") -> None:
    """``--resize_size`` and ``--crop_size``, whose defaults come from the checkpoint (:func:`resolve_sizes`)."""
    g.add_argument("--resize_size", type=cli.image_size_int, default=None,
                   help="shorter side before the centre crop (default: crop size x 256/224)")  # fmt: skip
    g.add_argument("--crop_size", type=cli.image_size_int, default=None,
                   help=f"{crop_help} (default: the --image_size the checkpoint was trained at, else 224)")  # fmt: skip


def default_resize(crop: int) -> int:
    """The shorter side before a centre crop of ``crop`` px: ImageNet's 256 for 224, the same ratio otherwise."""
    return round(crop * 256 / 224)


def trained_sizes(model: EvalModel) -> tuple[int | None, int | None, str]:
    """(crop, resize or None, where it is recorded) of what the network was trained at, or (None, None, "").

    A training checkpoint records its run's ``--image_size`` (and ``--knn_resize_size``); an exported
    backbone in ``<exp>/checkpoints/`` has its run's ``<exp>/logs/train_args.json`` beside it.
    """
    record, where = model.identity.get("training") or {}, "the checkpoint"
    weights = model.identity.get("weights")
    if not record.get("image_size") and weights and model.identity.get("kind") == "student":
        exp = exp_dir_of(None, weights)
        path = os.path.join(exp, "logs", "train_args.json") if exp else None
        record = (read_json(path) or {}) if path else {}
        where = path or where
    crop = record.get("image_size")
    return (crop, record.get("knn_resize_size") or None, where) if crop else (None, None, "")


def resolve_sizes(args: argparse.Namespace, model: EvalModel) -> None:
    """Set ``args.crop_size`` and ``args.resize_size``: the flags, else what the checkpoint was trained at, else
    ImageNet's 224 (resize: crop x 256/224); one log line gives the sizes and where they came from."""
    crop, resize, where = trained_sizes(model)
    if args.crop_size is not None:
        source = "--crop_size"
    elif crop:
        args.crop_size, source = crop, f"the training crop recorded in {where}"
    else:
        args.crop_size, source = 224, "ImageNet's (no training size recorded)"
    if args.resize_size is None:
        same = crop == args.crop_size and resize
        args.resize_size = resize if same else default_resize(args.crop_size)
    if args.crop_size > args.resize_size:
        raise UserError(
            f"centre crop {args.crop_size} px ({source}) is larger than --resize_size {args.resize_size}; "
            "give --crop_size too, at most the resize"
        )
    log.info("preprocessing: resize the shorter side to %d px, centre crop %d px (crop: %s; --resize_size and "
             "--crop_size change them)", args.resize_size, args.crop_size, source)  # fmt: skip


def check_common_args(args: argparse.Namespace, world_size: int) -> None:
    """Paths and sizes of the shared flags, before any work starts."""
    if args.crop_size and args.resize_size and args.crop_size > args.resize_size:
        raise UserError(f"--crop_size {args.crop_size} is larger than --resize_size {args.resize_size}")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} does not divide across {world_size} processes")
    split_folder(args.data, "train")
    split_folder(args.data, "val")
    if args.exp_dir and os.path.isfile(args.exp_dir):
        raise UserError(f"--exp_dir '{args.exp_dir}' is a file; give the experiment folder")
    if args.save and os.path.isfile(args.save):
        raise UserError(f"--save '{args.save}' is a file; give an output folder")
    cli.check_paths(weights={"--weights": args.weights}, files={"--class_list": args.class_list})


# ---------------------------------------------------------------- paths
def exp_dir_of(exp_dir: str | None, weights: str | None) -> str | None:
    """``--exp_dir``, or the experiment a ``<exp>/checkpoints/<file>`` checkpoint belongs to."""
    if exp_dir:
        return os.path.abspath(exp_dir)
    if weights and os.path.basename(os.path.dirname(os.path.abspath(weights))) == "checkpoints":
        return os.path.dirname(os.path.dirname(os.path.abspath(weights)))
    return None


def resolve_weights(weights: str | None, exp_dir: str | None, epoch: int | None) -> str:
    """``--weights``, else the experiment's ``ckpt_epoch_<epoch>.pth`` or its latest checkpoint."""
    if weights:
        return weights
    if not exp_dir:
        raise UserError("nothing to evaluate: give --weights FILE, --exp_dir DIR (a training run) or --random_init")
    if epoch is not None:
        return epoch_checkpoint_path(exp_dir, epoch)
    for name in (LATEST, "student_backbone.pth"):
        path = os.path.join(exp_dir, "checkpoints", name)
        if os.path.isfile(path):
            return path
    raise UserError(f"'{exp_dir}/checkpoints' has no {LATEST} or student_backbone.pth; train first or give --weights")


def prediction(args: argparse.Namespace) -> bool | int:
    """What ``--use_pred --head K`` selects: False (the backbone), True (head 1) or K (head K >= 2)."""
    if not args.use_pred:
        if args.head != 1:
            raise UserError(f"--head {args.head} selects a prediction head: add --use_pred")
        return False
    return True if args.head == 1 else args.head


def output_dir(save: str | None, exp_dir: str | None, sub: str, use_pred: bool | int) -> str:
    """``--save`` or ``<exp_dir>/<sub>``; the head's results go to a ``pred_head`` sub-folder (original)."""
    if not save and not exp_dir:
        raise UserError(f"no output folder: give --save DIR or --exp_dir DIR (results go to <exp_dir>/{sub})")
    out = os.path.abspath(save or os.path.join(exp_dir, sub))
    if not use_pred:
        return out
    return os.path.join(out, "pred_head" if use_pred is True else f"pred_head_{use_pred}")


# ---------------------------------------------------------------- the shared preamble
@dataclass
class Evaluation:
    """What both evaluation scripts set up first: the process group, the output folder, the frozen
    network, the centre-crop datasets and the key their features are stored under."""

    dist_info: DistInfo
    exp_dir: str | None
    out_dir: str
    model: EvalModel
    datasets: dict
    dtype: torch.dtype | None
    key: dict
    log_name: str

    def start_log(self) -> None:
        """Write the log to ``<out_dir>/<log_name>`` from now on (the lines so far included): called once the
        script's own checks passed, so a run refused at start-up leaves no output folder behind."""
        attach_log_file(os.path.join(self.out_dir, self.log_name), self.dist_info.is_main)


def prepare_evaluation(args: argparse.Namespace, sub: str, log_name: str) -> Evaluation:
    """Flags checked, logging to ``<out_dir>/<log_name>``, the network on its device, the data, the key.

    ``sub`` is the output folder under the experiment (``features``, ``linear``, ``linear_cached``). The log
    file is opened by :meth:`Evaluation.start_log`.
    """
    dist_info = distributed.init_distributed(args.device)
    check_common_args(args, dist_info.world_size)
    exp_dir = exp_dir_of(args.exp_dir, args.weights)
    out_dir = output_dir(args.save, exp_dir, sub, prediction(args))
    setup_logging(None, dist_info.is_main, args.debug)
    model = build_model_from_args(args).to(dist_info.device)
    resolve_sizes(args, model)
    cli.check_batch_fits(args.batch_size // dist_info.world_size, args.crop_size, "--batch-size")
    datasets = eval_datasets(args.data, args.resize_size, args.crop_size, classes_from_args(args))
    dtype = amp_dtype(args.amp, dist_info.device)
    key = feature_key(model, args.resize_size, args.crop_size, dtype, fingerprints(datasets))
    return Evaluation(dist_info, exp_dir, out_dir, model, datasets, dtype, key, log_name)


def features_from_args(
    ev: Evaluation, args: argparse.Namespace, folder: str, splits: dict, reuse: str = "auto", on_device: bool = False
):
    """:func:`centre_crop_features` of ``splits`` with the flags' batch, workers and saving."""
    return centre_crop_features(
        ev.model,
        splits,
        FeatureStore(folder),
        ev.key,
        batch_size=max(1, args.batch_size // ev.dist_info.world_size),
        workers=args.workers,
        dist_info=ev.dist_info,
        dtype=ev.dtype,
        reuse=reuse,
        save=not args.no_save_features,
        on_device=on_device,
    )


# ---------------------------------------------------------------- network, data, features
def build_model_from_args(args: argparse.Namespace) -> EvalModel:
    """The frozen network the flags describe (a checkpoint, or --random_init)."""
    if args.random_init:
        if args.weights or not args.arch:
            raise UserError("--random_init evaluates an untrained --arch: give --arch and no --weights")
        return random_init_model(args.arch, args.seed)
    exp_dir = exp_dir_of(args.exp_dir, args.weights)
    weights = resolve_weights(args.weights, exp_dir, args.epoch)
    model = load_eval_model(weights, args.arch, args.format, prediction(args), args.teacher, args.teacher_pool)
    say_training_progress(model, weights)
    return model


def say_training_progress(model: EvalModel, weights: str) -> None:
    """One line naming the epoch a training checkpoint holds; a warning when its run is not finished (an
    experiment still training, or stopped), so its numbers are not taken for the final ones."""
    training = model.identity.get("training")
    if not training:
        return
    done, planned, steps = model.identity.get("epoch") or 0, training["epochs"], training["steps_into_next"]
    where = f"epoch {done} of {planned}" + (f" and {steps} step(s) of epoch {done + 1}" if steps else "")
    if done >= planned:
        log.info("'%s' holds the finished run (%s)", weights, where)
    else:
        log.warning("'%s' holds %s: its run is not finished (still training, or stopped); these are that "
                    "checkpoint's numbers", weights, where)  # fmt: skip


def classes_from_args(args: argparse.Namespace) -> list[str] | None:
    return select_classes(args.data, args.class_list, args.dataset)


def feature_key(model: EvalModel, resize: int, crop: int, dtype: torch.dtype | None, fingerprints: dict) -> dict:
    """What the centre-crop features depend on; a saved copy is valid only if this matches exactly."""
    ident = model.identity
    pool = {"pool": ident["pool"]} if ident.get("pool") else {}  # ViT teachers only: other keys stay as they were
    return {
        "model": {k: ident.get(k) for k in ("kind", "weights_sha256", "format", "arch", "use_pred")} | pool,
        "preprocessing": {"resize_size": resize, "crop_size": crop, "autocast": str(dtype or "float32")},
        "data": fingerprints,
    }


def centre_crop_features(
    model: EvalModel,
    datasets: dict,
    store: FeatureStore,
    key: dict,
    *,
    batch_size: int,
    workers: int,
    dist_info: DistInfo,
    dtype: torch.dtype | None,
    reuse: str = "auto",
    save: bool = True,
    on_device: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{split: (features (N, D) float16-rounded float32, labels (N,))} on rank 0 (None elsewhere).

    ``reuse``: ``auto`` reuses saved features whose key matches and recomputes otherwise;
    ``require`` (an explicit ``--use_cache``) refuses stale ones; ``never`` recomputes.
    Features are rounded to float16 in every case, so reused and fresh features give equal results.
    ``on_device``: fresh features stay on the device that computed them when they fit (k-NN searches
    there); saved ones are read into host memory.
    """
    splits = tuple(datasets)
    status, reason = store.check(key, splits)
    if status == "stale" and reuse == "require":
        raise UserError(
            f"--use_cache: the saved features in '{store.folder}' were computed from another checkpoint or setting "
            f"({reason}); run without --use_cache to recompute them, or choose another --save folder"
        )
    if status == "match" and reuse != "never":
        log.info("reusing features in %s (%s)", store.folder, reason)
        return _load_on_rank0(store, splits, dist_info.is_main)
    if status == "stale":
        log.warning("saved features in %s are stale (%s); recomputing", store.folder, reason)
    out, start = {}, time.perf_counter()
    for split, dataset in datasets.items():
        got = extract_features(model, dataset, batch_size=batch_size, num_workers=workers, dist_info=dist_info,
                               amp_dtype=dtype, desc=split, on_device=on_device)  # fmt: skip
        if got is not None:
            out[split] = (got[0].to(torch.float16).float(), got[1])
    if not out:
        return None
    log.info("features of %s computed in %.1f s", "+".join(splits), time.perf_counter() - start)
    if save:
        store.save(key, out, {"weights": model.identity.get("weights"), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    return out


def _load_on_rank0(store: FeatureStore, splits: tuple[str, ...], is_main: bool):
    if not is_main:
        return None
    return {s: (f.float(), y) for s, (f, y) in ((s, store.load(s)) for s in splits)}


def eval_datasets(root: str, resize: int, crop: int, classes: list[str] | None, splits=("train", "val")) -> dict:
    """Centre-crop datasets; val uses train's class list so labels agree.

    ``classes`` is the selection (``--class_list``, ``--dataset imagenet100``; None: every folder). Without
    one, a val/ class folder that train/ lacks is refused: its images could not be predicted and would
    otherwise drop out of the accuracy unnoticed.
    """
    train = build_eval_dataset(root, "train", resize, crop, classes)
    out = {"train": train}
    if "val" in splits:
        if classes is None:
            check_val_classes(root, train.classes)
        out["val"] = build_eval_dataset(root, "val", resize, crop, train.classes)
    return out


def check_val_classes(root: str, train_classes: list[str]) -> None:
    """A DataError when ``root/val`` holds class folders that ``root/train`` lacks, naming them."""
    extra = [c for c in list_class_folders(split_folder(root, "val")) if c not in set(train_classes)]
    if extra:
        samples = scan_class_folders(os.path.join(root, "val"), extra)
        names = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise DataError(
            f"val/ has {len(extra)} class folder(s) that train/ lacks ({names}; {len(samples)} images), which no "
            "train image can match; add them to train/, move them out of val/, or evaluate a subset with --class_list"
        )


def fingerprints(datasets: dict) -> dict:
    """{split: data.datasets.dataset_fingerprint} of evaluation datasets."""
    return {split: dataset_fingerprint(ds) for split, ds in datasets.items()}
