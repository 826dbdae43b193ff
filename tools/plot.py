"""Training curves of one or several runs, overlaid in one PNG (no display needed).

Reads each run's ``logs/train_log.jsonl``: the loss (and each teacher's with several teachers), the
learning rate, images/s and, for runs with ``--knn_every N``, k-NN top-1 on val.

    python -m tools.plot exp/demo                                  # -> exp/demo/logs/train_curves.png
    python -m tools.plot exp/head4 exp/head2 --labels "4 layers" "2 layers" --out heads.png
"""

from __future__ import annotations

import argparse
import logging
import os

from models.errors import UserError
from tools.engine import cli
from tools.engine.cli import add_debug_flag, run_cli
from tools.engine.logs import setup_logging
from tools.study.curves import plot_runs, read_log

log = logging.getLogger("simreg.plot")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("training curves", add_help=add_help)
    p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="experiment folders of train_student.py")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per EXP_DIR (default: folder names)")
    p.add_argument("--out", default=None, help="PNG to write (default: EXP_DIR/logs/train_curves.png for one run, "
                   "train_curves.png here for several)")  # fmt: skip
    p.add_argument("--title", default=None, help="figure title")
    add_debug_flag(p)
    return p


def default_out(exp_dirs: list[str]) -> str:
    """One run: its own ``logs/train_curves.png``; several: ``train_curves.png`` in the current folder."""
    return os.path.join(exp_dirs[0], "logs", "train_curves.png") if len(exp_dirs) == 1 else "train_curves.png"


def main(args: argparse.Namespace) -> str:
    setup_logging(debug=args.debug)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.exp_dirs]
    if len(labels) != len(args.exp_dirs):
        raise UserError(f"--labels has {len(labels)} names for {len(args.exp_dirs)} EXP_DIRs; give one per folder")
    if len(set(labels)) != len(labels):
        raise UserError(f"two runs share the label {sorted(set(x for x in labels if labels.count(x) > 1))[0]!r}; "
                        "give distinct --labels")  # fmt: skip
    out = args.out or default_out(args.exp_dirs)
    if os.path.isdir(out):
        raise UserError(f"--out '{out}' is a folder; give the PNG file to write")
    runs = {label: read_log(d) for label, d in zip(labels, args.exp_dirs, strict=True)}
    plot_runs(runs, out, args.title)
    print(os.path.abspath(out), flush=True)
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
