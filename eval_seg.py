"""Linear segmentation probe of a frozen backbone: mIoU and pixel accuracy on Pascal VOC 2012 or ADE20K.

The dense evaluation DINOv2 and RADIO report, on this project's cached features: every image resized
whole to --image_size (448 by default: a multiple of 14, 16 and 32), the backbone's last feature map
computed once and stored (float16), then BatchNorm + a 1x1 convolution trained on it with cross-entropy
(label 255 ignored; AdamW, cosine schedule), its logits bilinearly upsampled to the labels. Scores on the
val split at each image's own size, written to <save>/seg_results.json, the probe to <save>/probe.pth
(docs/dense.md).

    python eval_seg.py /data/VOCdevkit/VOC2012 --weights exp/r18/checkpoints/checkpoint_latest.pth --save exp/r18/seg
    python eval_seg.py /data/ADEChallengeData2016 --exp_dir exp/r18          # results in exp/r18/seg
    python eval_seg.py /data/VOCdevkit/VOC2012 --weights dinov2_vits14.pth --teacher --save seg/dinov2_s14
    python eval_seg.py demo_seg --arch resnet18 --random_init --save seg/random_r18 --image_size 128
"""

from __future__ import annotations

import argparse
import logging
import os

from data.segmentation import detect_layout, list_pairs
from models.errors import UserError
from models.io import atomic_save, write_json
from tools.engine import cli, distributed
from tools.engine.logs import setup_logging
from tools.engine.step import amp_dtype
from tools.eval.common import add_network_args, build_model_from_args, exp_dir_of, output_dir
from tools.eval.seg_probe import ProbeSettings, segmentation_probe

log = logging.getLogger("simreg.eval_seg")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("SimReg linear segmentation probe", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("data", metavar="DATA", help="a Pascal VOC 2012 folder (JPEGImages/, SegmentationClass/, "
                   "ImageSets/Segmentation/) or an ADE20K one (images/, annotations/)")  # fmt: skip
    g.add_argument("--image_size", type=cli.image_size_int, default=448, help="images are resized whole to S x S")
    cli.add_workers_arg(g, "workers")
    g.add_argument("--extract_batch", type=cli.positive_int, default=32, help="images per feature-map batch")
    g = p.add_argument_group("network")
    add_network_args(g)
    g.add_argument("--epoch", type=cli.nonneg_int, default=None, help="with --exp_dir: evaluate ckpt_epoch_<N>.pth")
    g = p.add_argument_group("probe")
    g.add_argument("--epochs", type=cli.positive_int, default=20)
    g.add_argument("--batch_size", type=cli.positive_int, default=16, help="images per probe step")
    g.add_argument("--lr", type=cli.positive_float, default=1e-3, help="AdamW learning rate (cosine to 0)")
    g.add_argument("--wd", dest="weight_decay", type=cli.nonneg_float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--no_bn", action="store_true", help="a plain 1x1 convolution (no BatchNorm before it)")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--exp_dir", default=None, help="a training run: its latest checkpoint, results in <exp_dir>/seg")
    g.add_argument("--save", default=None, help="output folder for seg_results.json (default: <exp_dir>/seg)")
    g.add_argument("--features_dir", default=None, help="where the feature maps are stored (default: <save>/features)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto = bf16 on CUDA")
    cli.add_runtime_args(g)
    p.set_defaults(use_pred=False, head=1, teacher_pool="auto")  # what the shared model loader reads
    return p


def check_args(args: argparse.Namespace) -> None:
    """Paths and flags, before any work starts."""
    cli.check_output_folder("--save", args.save)
    cli.check_output_folder("--exp_dir", args.exp_dir)
    cli.check_output_folder("--features_dir", args.features_dir)
    cli.check_paths(weights={"--weights": args.weights})
    if args.random_init and args.teacher:
        raise UserError("--random_init evaluates an untrained student --arch; drop --teacher")
    cli.check_batch_fits(max(args.extract_batch, args.batch_size), args.image_size, "--extract_batch")
    layout = detect_layout(args.data)  # the data's mistakes before a network is loaded
    for split in ("train", "val"):
        list_pairs(layout, split)


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    exp_dir = exp_dir_of(args.exp_dir, args.weights)
    out_dir = output_dir(args.save, exp_dir, "seg", False)
    setup_logging(os.path.join(out_dir, "eval_seg.log"), True, args.debug)
    device = distributed.pick_device(args.device, 0)  # one process: the probe is small next to the extraction

    # ============ the network ============
    model = build_model_from_args(args).to(device)

    # ============ feature maps (once), the probe, its scores ============
    settings = ProbeSettings(args.image_size, args.epochs, args.batch_size, args.lr, args.weight_decay,
                             not args.no_bn, args.seed, args.extract_batch, args.workers)  # fmt: skip
    store = args.features_dir or os.path.join(out_dir, "features")
    result, probe = segmentation_probe(model, args.data, store, settings, device, amp_dtype(args.amp, device))
    atomic_save(probe.state_dict(), os.path.join(out_dir, "probe.pth"))
    write_json(os.path.join(out_dir, "seg_results.json"), result)
    log.info("mIoU %.2f, pixel accuracy %.2f (%d classes scored) -> %s", result["miou"], result["pixel_acc"],
             result["classes_scored"], os.path.join(out_dir, "seg_results.json"))  # fmt: skip
    return result


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
