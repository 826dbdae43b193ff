"""Hours for the paper's runs (130 epochs of ImageNet-1k) from a benchmark's JSON rows, on 1 and 8 GPUs.

    python -m tools.bench_hours bench_gpu.json                          # a Markdown table on stdout
    python -m tools.bench_hours bench_gpu.json --main_job main_job.json --out projection.md

Runs: R50 -> R18 with a live and with a cached teacher, SimCLR-x4 -> R50 cached; for each the GPU step
rate against the loader's (CPU decoding: measured per-core rate x cores per GPU; GPU decoding: decode
and step share the GPU), and which of them bounds the run. The model is in ``tools/bench/projection.py``.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import UserError
from models.io import atomic_write, read_json
from tools.bench.projection import Assumptions, project, table
from tools.engine import cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hours for the paper's runs", add_help=add_help)
    p.add_argument("rows", help="JSON rows of python -m tools.benchmark (--profile gpu on the GPU to project)")
    p.add_argument("--main_job", default=None, help="main_job.json of python -m tools.main_job_check, to list too")
    p.add_argument("--cores_per_gpu", type=cli.positive_int, default=16, help="host cores feeding each GPU")
    p.add_argument("--ddp_efficiency", type=cli.fraction_float, default=0.9, help="per-GPU rate on 8 GPUs vs 1")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    cli.add_debug_flag(p)
    return p


def load_rows(path: str, flag: str) -> list:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{flag} '{path}' is not a JSON list of rows; give the file --json wrote")
    return rows


def main(args: argparse.Namespace) -> str:
    cli.check_paths(files={"rows": args.rows, "--main_job": args.main_job})
    cli.check_output_file("--out", args.out)
    rows = load_rows(args.rows, "rows")
    main_job = load_rows(args.main_job, "--main_job") if args.main_job else None
    assumptions = Assumptions(cores_per_gpu=args.cores_per_gpu, ddp_efficiency=args.ddp_efficiency)
    projections = project(rows, assumptions)
    if not projections:
        raise UserError(f"'{args.rows}' has no step or data rows to project from; give a benchmark's full JSON")
    text = table(projections, rows, assumptions, main_job)
    print(text, end="")
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))
    return text


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
