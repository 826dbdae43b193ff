"""Export a student (or a teacher) for deployment and sharing, checked against PyTorch before it is written.

Any checkpoint the evaluation scripts read: this project's training checkpoints and exported
backbones, the authors' released students, CompRess students, torchvision state dicts, every teacher.

    python -m tools.export exp/r18/checkpoints/checkpoint_latest.pth --format onnx --out r18.onnx
    python -m tools.export exp/r18/checkpoints/checkpoint_latest.pth --format safetensors --out r18.safetensors
    python -m tools.export exp/r18/checkpoints/checkpoint_latest.pth --format torchvision --out r18_tv.pth
    python -m tools.export exp/r18/checkpoints/checkpoint_latest.pth --format onnx --with_head --out r18_head.onnx

The backbone by default (its pooled feature); ``--with_head`` exports the prediction head's output
(``--head K``: teacher K's head of a several-teacher student). ONNX and TorchScript files hold the
whole network: float images in [0, 1], shape (batch, 3, S, S) with a dynamic batch, normalised inside.
``FILE.json`` beside the export records the source, the input contract and the measured agreement.
"""

from __future__ import annotations

import argparse
import logging
import os

from models.errors import UserError
from models.formats import FORMATS
from models.io import atomic_write, write_json
from models.pretrained import EvalModel, load_eval_model
from tools.deploy.exporters import (
    EXPORT_FORMATS,
    STATE_DICT_FORMATS,
    Exported,
    export_onnx,
    export_record,
    export_safetensors,
    export_state_dict,
    export_torchscript,
    normalisation,
)
from tools.engine import cli
from tools.engine.logs import setup_logging
from tools.eval.common import prediction

log = logging.getLogger("simreg.export")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("export a network for deployment", add_help=add_help)
    g = p.add_argument_group("network")
    g.add_argument("weights", metavar="CKPT", help="checkpoint (any student or teacher format eval_knn.py reads)")
    g.add_argument("-a", "--arch", default=None, help="architecture; default: read from the checkpoint")
    g.add_argument("--ckpt_format", default="auto", help=f"checkpoint layout: {', '.join(['auto', *FORMATS])}")
    g.add_argument("--teacher", action="store_true", help="load CKPT as a teacher (any teacher format)")
    g.add_argument("--with_head", "--use_pred", dest="use_pred", action="store_true",
                   help="export the prediction head's output instead of the backbone's")  # fmt: skip
    g.add_argument("--head", type=cli.positive_int, default=1, help="with --with_head: the head of teacher K (1-based)")
    cli.add_pool_arg(g)
    g = p.add_argument_group("export")
    g.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    g.add_argument("--out", required=True, help="the file to write (FILE.json beside it records what it holds)")
    g.add_argument("--image_size", type=cli.image_size_int, default=224,
                   help="height and width of the ONNX / TorchScript input, and of the check images")  # fmt: skip
    g.add_argument("--opset", type=cli.positive_int, default=None, help="ONNX opset (default: the exporter's)")
    cli.add_debug_flag(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Paths and flags that need each other, before any work starts."""
    cli.check_paths(weights={"CKPT": args.weights})
    if os.path.isdir(args.out):
        raise UserError(f"--out '{args.out}' is a folder; give the file to write")
    if os.path.abspath(args.out) == os.path.abspath(args.weights):
        raise UserError(f"--out '{args.out}' is the checkpoint itself; write the export to another file")
    if args.format == "safetensors" and not args.out.endswith(".safetensors"):
        raise UserError(f"--out '{args.out}' must end in .safetensors, the name by which safetensors files are read")
    if args.opset is not None and args.format != "onnx":
        raise UserError(f"--opset is an ONNX setting; drop it or use --format onnx (not {args.format})")


def build_model(args: argparse.Namespace) -> EvalModel:
    """The frozen network the flags describe, as the evaluation scripts load it."""
    return load_eval_model(args.weights, args.arch, args.ckpt_format, prediction(args), args.teacher, args.teacher_pool)


def export(model: EvalModel, args: argparse.Namespace) -> Exported:
    """The file's bytes in ``--format``, checked against the PyTorch network."""
    if args.format in STATE_DICT_FORMATS:
        return export_state_dict(model, args.format, args.image_size)
    if args.format == "safetensors":
        layout = "simreg_original (encoder_q.module.*, predict_q.module.*)" if model.head is not None else "plain"
        metadata = {"producer": "simreg tools.export", "arch": model.arch, "layout": layout,
                    "feat_dim": str(model.feat_dim), "normalisation": normalisation(model),
                    "source_sha256": model.identity.get("weights_sha256", "")}  # fmt: skip
        return export_safetensors(model, metadata)
    if args.format == "onnx":
        return export_onnx(model, args.image_size, args.opset)
    return export_torchscript(model, args.image_size)


def main(args: argparse.Namespace) -> dict:
    setup_logging(None, True, args.debug)
    check_args(args)
    prediction(args)  # --head K needs --with_head: refused before the checkpoint is read
    model = build_model(args)
    exported = export(model, args)
    atomic_write(args.out, lambda f: f.write(exported.payload))
    record = export_record(model, args.format, args.out, exported.agreement, args.image_size)
    write_json(args.out + ".json", record)
    norm = "normalisation inside" if record["input"]["normalisation_inside"] else "normalise the input first"
    log.info("exported %s (%s, %d-d %s) to %s (%.1f MB, %s; record in %s.json)", args.weights, model.arch,
             model.feat_dim, record["output"], args.out, len(exported.payload) / 1e6, norm, args.out)  # fmt: skip
    log.info("check: %s", exported.agreement.summary())
    return record


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
