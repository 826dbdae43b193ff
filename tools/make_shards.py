"""Write a folder of images as WebDataset shards with their index, in the dataset's own order:

    python -m tools.make_shards /path/to/imagenet shards/ --shard_size 10000
    python train_student.py 'shards/train-{000000..000128}.tar' ...same flags as for the folder...

FOLDER is read as ``train_student.py`` reads it (``FOLDER/train`` when it exists; class folders or any
layout, ``--layout``), and sample i of the shards is image i of the folder: the same crops, losses and
dataset fingerprint, so runs, teacher caches and features carry over between the two. Shard s holds
samples ``s * N .. (s + 1) * N - 1`` under the key ``%09d`` (the sample's number): the image's bytes
unchanged (``.jpg``, ``.png``, ...), its path in the folder (``.path``) and, for class folders, its label
(``.cls``). The same images give byte-identical shards; an interrupted run keeps the shards it finished.

Shards made by another tool (img2dataset, webdataset's ShardWriter, ...) need only their index:

    python -m tools.make_shards --index 'shards/train-{000000..001023}.tar'
"""

from __future__ import annotations

import argparse
import logging

from data.datasets import DataError, FolderFiles
from data.shards import expand_spec, index_shard, is_shard_spec, shard_files, write_index, write_shards
from data.sources import check_data, open_images
from data.sources import describe as describe_data
from models.errors import UserError
from tools.engine import cli
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.shards")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("write image folders as indexed WebDataset shards", add_help=add_help)
    p.add_argument("folder", nargs="?", help="the images: a dataset root holding train/, or any folder of images")
    p.add_argument("out", nargs="?", help="output folder for <prefix>-NNNNNN.tar and their indexes")
    p.add_argument("--shard_size", type=cli.positive_int, default=10_000, help="images per shard")
    p.add_argument("--prefix", default="train", help="shard file names: <prefix>-000000.tar, ...")
    cli.add_layout_arg(p)
    p.add_argument("--index", metavar="SHARDS", default=None,
                   help="instead: index existing shards, e.g. 'shards/train-{000000..001023}.tar'")  # fmt: skip
    cli.add_debug_flag(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """The two ways to call the command, and their paths, before any work."""
    if args.index:
        if args.folder or args.out:
            raise UserError("--index SHARDS indexes existing shards; give no FOLDER and OUT with it")
        if not is_shard_spec(args.index):
            raise UserError(f"--index '{args.index}' names no .tar files; give shards like 'DIR/train-{{0..9}}.tar'")
        return
    if not args.folder or not args.out:
        raise UserError("give FOLDER and OUT (python -m tools.make_shards FOLDER OUT), or --index SHARDS")
    if is_shard_spec(args.folder):
        raise UserError(f"'{args.folder}' names shards already; give the folder of images to write as shards")
    check_data(args.folder)
    cli.check_output_folder("OUT", args.out)
    if "/" in args.prefix or not args.prefix:
        raise UserError(f"--prefix '{args.prefix}' must be a file name prefix without '/'")


def read_file(files: FolderFiles, i: int) -> bytes:
    """Image ``i``'s bytes, unchanged."""
    path = files.where(i)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"cannot read image '{path}' ({exc}); delete or replace the file") from exc


def index_existing(spec: str) -> None:
    """Write (or rewrite) the index of every shard ``spec`` names."""
    shards = shard_files(spec)
    for n, shard in enumerate(shards, 1):
        arrays = index_shard(shard)
        write_index(shard, arrays)
        log.info("indexed %d/%d: %s (%d images)", n, len(shards), shard, len(arrays["offsets"]))
    log.info("train on them with: python train_student.py '%s' ...", spec)


def main(args: argparse.Namespace) -> str:
    setup_logging(None, True, args.debug)
    check_args(args)
    if args.index:
        index_existing(args.index)
        return args.index
    dataset = open_images(args.folder, layout=args.layout)
    log.info("writing %s as shards of %d images into %s", describe_data(dataset), args.shard_size, args.out)
    spec = write_shards(dataset.index, lambda i: read_file(dataset.files, i), args.out, args.shard_size, args.prefix)
    log.info("%d shard(s) written; train on them with: python train_student.py '%s' ...", len(expand_spec(spec)), spec)
    return spec


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
